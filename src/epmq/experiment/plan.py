"""The plan of an experiment: every model variant a config asks for, in run order.

Pure bookkeeping, no tensors: a config's merges × quantizers × bits × group sizes, the
unrounded targets of solvers that have one (E-PMQ's W*), the X-source study and the α sweep
of the solvers that fit expert-guided targets (both on the first merge) become a flat list of
:class:`Variant` s grouped by merge, so the runner is one loop and tests can check the plan.
Which variants a solver gets is read from its declaration (:mod:`epmq.quant.solvers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from epmq.experiment.config import ExperimentConfig
from epmq.quant.solvers import get_solver
from epmq.quant.solvers.registry import X_SOURCES

SWEEP = "alpha"


@dataclass(frozen=True)
class Variant:
    """One model to build from a merge and evaluate.

    ``kind`` is ``"merged"`` (the full-precision merge), ``"target"`` (a solver's unrounded
    target, E-PMQ's W*), or ``"quantized"``. ``alpha`` and ``target`` are set where a study
    varies them (else the config's settings apply). ``sweep`` names the sweep a variant
    belongs to (it is then reported as a sweep point, not a table row). :attr:`name` is its
    label in reports, :attr:`slug` its folder name; both come from the solver's declarations.
    """

    merge: str
    kind: str
    quantizer: str | None = None
    bits: int | None = None
    group_size: int | None = None
    alpha: float | None = None
    x_source: str | None = None
    target: str | None = None
    sweep: str | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        """The solver parameters this variant sets itself (a study's α or target)."""
        values = {"alpha": self.alpha, "target": self.target}
        return {k: v for k, v in values.items() if v is not None}

    def _described(self, shown: list[str], x_label: str) -> list[str]:
        if self.x_source not in (None, "quantized"):
            shown.insert(min(1, len(shown)), x_label)
        return shown

    @property
    def name(self) -> str:
        if self.kind == "merged":
            return self.merge
        solver = get_solver(self.quantizer or "")
        if self.kind == "target":
            return f"{self.merge} + {solver.label} target W* (α={self.alpha:g}, unrounded)"
        group = "" if self.group_size in (None, -1) else f" g{self.group_size}"
        label = f"{self.merge} + {self.quantizer} w{self.bits}{group}"
        extras = self._described(solver.labels(self.overrides), f"X={self.x_source}")
        return label + (f" ({', '.join(extras)})" if extras else "")

    @property
    def slug(self) -> str:
        """A file-system-safe folder name (``task_arithmetic-epmq-w4-g128-a0.1``)."""
        parts = [self.merge, self.quantizer or self.kind, f"w{self.bits}"]
        if self.group_size not in (None, -1):
            parts.append(f"g{self.group_size}")
        if self.quantizer is not None:
            solver = get_solver(self.quantizer)
            parts += self._described(solver.slugs(self.overrides), f"x-{self.x_source}")
        return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "-".join(parts))


def plan_experiment(config: ExperimentConfig) -> list[Variant]:
    """Every variant of ``config``, grouped by merge, each listed once."""
    q = config.quantization
    variants: list[Variant] = []
    for number, merge in enumerate(config.merges):
        name = merge.method
        studied = number == 0  # the X-source study and the α sweep run on the first merge
        variants.append(Variant(merge=name, kind="merged"))
        for method in q.methods:
            solver = get_solver(method)
            if solver.grid == "optional" and q.evaluate_target:
                variants.append(_variant(config, name, method, kind="target"))
        for bits in q.bits:
            for group in q.group_sizes:
                for method in q.methods:
                    variants.append(_variant(config, name, method, bits=bits, group_size=group))
        study_bits, study_group = min(q.bits), q.group_sizes[0]
        guided = [m for m in q.methods if get_solver(m).studied] if studied else []
        for method in guided:
            base = _variant(config, name, method, bits=study_bits, group_size=study_group)
            if q.x_source_study:
                for source in X_SOURCES:
                    if source != q.x_source:
                        variants.append(replace(base, x_source=source))
            for alpha in q.alpha_sweep:
                for target in ("expert", "merged"):
                    variants.append(replace(base, alpha=alpha, target=target, sweep=SWEEP))
    return _dedupe(variants)


def _variant(config: ExperimentConfig, merge: str, method: str, **fields: Any) -> Variant:
    """A variant of ``method``: a solver fitting expert-guided targets records the config's
    α, target and X-source (its rows are compared across them); the others record none."""
    q = config.quantization
    kind = fields.pop("kind", "quantized")
    if get_solver(method).studied:
        fields.update(alpha=q.alpha, target=q.target, x_source=q.x_source)
    return Variant(merge=merge, kind=kind, quantizer=method, **fields)


def _dedupe(variants: list[Variant]) -> list[Variant]:
    """Drop repeats; a sweep point equal to a table row is computed once (kept as the row)."""
    seen: set[Variant] = set()
    out: list[Variant] = []
    for v in variants:
        key = replace(v, sweep=None)
        if key in seen:
            continue
        seen.add(key)
        out.append(v)
    return out
