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

from epmq.calib.task_weights import AUTO, UNIFORM, TaskWeightSetting
from epmq.eval.gains import TASK_WEIGHTS_STUDY
from epmq.eval.results import ALPHA_SWEEP, Results, SweepPoint, average
from epmq.experiment.config import ExperimentConfig
from epmq.quant.solvers import get_solver
from epmq.quant.solvers.registry import X_SOURCES

SWEEP = "alpha"


X_SOURCE_STUDY = "x_source"


@dataclass(frozen=True)
class Variant:
    """One model to build from a merge and evaluate.

    ``kind`` is ``"merged"`` (the full-precision merge), ``"target"`` (a solver's unrounded
    target, E-PMQ's W*), or ``"quantized"``. ``overrides`` are the solver parameters a study
    sets itself (the α sweep's α and target; else the config's parameters apply), ``x_source``
    where its inputs come from (solvers fitting expert-guided targets). ``study`` names the
    study a variant belongs to: the α sweep's points (:data:`SWEEP`, reported as sweep points)
    or the X-source study's rows (:data:`X_SOURCE_STUDY`), or the task-weights study's
    (:data:`TASK_WEIGHTS_STUDY`, ``task_weights`` naming their setting: ``uniform`` or
    ``auto``; None: the config's); None for the main table. :attr:`name` is its label in
    reports, :attr:`slug` its folder name; both come from the solver's declarations.
    """

    merge: str
    kind: str
    quantizer: str | None = None
    bits: int | None = None
    group_size: int | None = None
    x_source: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    study: str | None = None
    task_weights: str | None = None

    @property
    def sweep(self) -> str | None:
        """The sweep this variant is a point of (reported as a sweep point, not a row)."""
        return self.study if self.study == SWEEP else None

    def _described(self, shown: list[str], x_label: str) -> list[str]:
        if self.study == X_SOURCE_STUDY:
            shown.insert(min(1, len(shown)), x_label)
        if self.study == TASK_WEIGHTS_STUDY:
            shown.append(f"weights={self.task_weights}")
        return shown

    @property
    def name(self) -> str:
        if self.kind == "merged":
            return self.merge
        solver = get_solver(self.quantizer or "")
        extras = self._described(solver.labels(dict(self.overrides)), f"X={self.x_source}")
        if self.kind == "target":
            return f"{self.merge} + {solver.label} target W* ({', '.join([*extras, 'unrounded'])})"
        group = "" if self.group_size in (None, -1) else f" g{self.group_size}"
        label = f"{self.merge} + {self.quantizer} w{self.bits}{group}"
        return label + (f" ({', '.join(extras)})" if extras else "")

    @property
    def slug(self) -> str:
        """A file-system-safe folder name (``task_arithmetic-epmq-w4-g128-a0.1``)."""
        parts = [self.merge, self.quantizer or self.kind, f"w{self.bits}"]
        if self.group_size not in (None, -1):
            parts.append(f"g{self.group_size}")
        if self.quantizer is not None:
            solver = get_solver(self.quantizer)
            shown = self._described(solver.slugs(dict(self.overrides)), f"x-{self.x_source}")
            parts += [part.replace("weights=", "weights-") for part in shown]
        return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "-".join(parts))

    def params(self, config: ExperimentConfig) -> dict[str, Any]:
        """The solver parameters this variant runs with: the config's, then its overrides."""
        if self.quantizer is None:
            return {}
        return config.quantization.solver_params(self.quantizer, **dict(self.overrides))

    def weights_setting(self, config: ExperimentConfig) -> TaskWeightSetting:
        """The task weights this variant is calibrated with: its study's, else the config's."""
        return self.task_weights or config.quantization.task_weights  # type: ignore[return-value]


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
        if q.task_weights_study:
            other = UNIFORM if q.task_weights == AUTO else AUTO
            variants += [
                replace(v, study=TASK_WEIGHTS_STUDY, task_weights=other)
                for v in variants
                if v.merge == name and v.kind == "quantized" and v.x_source is not None
            ]  # the rows of solvers fitting expert-guided targets (they record an X-source)
        study_bits, study_group = min(q.bits), q.group_sizes[0]
        guided = [m for m in q.methods if get_solver(m).studied] if studied else []
        for method in guided:
            base = _variant(config, name, method, bits=study_bits, group_size=study_group)
            if q.x_source_study:
                for source in X_SOURCES:
                    if source != base.x_source:
                        variants.append(replace(base, x_source=source, study=X_SOURCE_STUDY))
            for alpha in q.alpha_sweep:
                for target in ("expert", "merged"):
                    overrides = (("alpha", alpha), ("target", target))
                    variants.append(replace(base, overrides=overrides, study=SWEEP))
    return _dedupe(config, variants)


def _variant(config: ExperimentConfig, merge: str, method: str, **fields: Any) -> Variant:
    """A variant of ``method``; a solver fitting expert-guided targets records the config's
    X-source (its rows are compared across X-sources)."""
    kind = fields.pop("kind", "quantized")
    solver = get_solver(method)
    if solver.studied:
        fields.update(x_source=config.quantization.x_source or solver.default_x_source)
    return Variant(merge=merge, kind=kind, quantizer=method, **fields)


def _dedupe(config: ExperimentConfig, variants: list[Variant]) -> list[Variant]:
    """Drop repeats; a sweep point that runs the table's settings is computed once (kept as
    the row, and reported as a sweep point too)."""
    seen: set[tuple[Any, ...]] = set()
    out: list[Variant] = []
    for v in variants:
        key = (
            replace(v, overrides=(), study=None),
            tuple(sorted(v.params(config).items())),
        )
        if key in seen:
            continue
        seen.add(key)
        out.append(v)
    return out


def sweep_point(
    variant: Variant, config: ExperimentConfig, accuracy: dict[str, float]
) -> SweepPoint:
    """The α-sweep point ``variant`` measured (its average over the tasks)."""
    return SweepPoint(
        merge=variant.merge,
        bits=variant.bits,
        group_size=None if variant.group_size in (None, -1) else variant.group_size,
        quantizer=variant.quantizer,
        x_source=variant.x_source,  # type: ignore[arg-type]
        params=variant.params(config),
        average=sum(accuracy.values()) / len(accuracy),
    )


def collect_sweep_from_rows(results: Results, config: ExperimentConfig) -> None:
    """Table rows that are also sweep points (deduplicated in the plan) join the sweep."""
    q = config.quantization
    if not q.alpha_sweep:
        return
    bits, group = min(q.bits), q.group_sizes[0]
    group_size = None if group == -1 else group
    sweep = results.sweeps.setdefault(ALPHA_SWEEP, [])
    studied = config.merges[0].method  # the sweep runs on the first merge only (see plan)
    rows = [
        row
        for method in q.methods
        if get_solver(method).studied
        for row in results.find(
            kind="quantized", quantizer=method, bits=bits, group_size=group_size, merge=studied
        )
    ]
    for row in rows:
        if row.is_primary and row.params.get("alpha") in q.alpha_sweep:
            sweep.append(
                SweepPoint(
                    merge=row.merge,
                    bits=bits,
                    group_size=group_size,
                    quantizer=row.quantizer,
                    x_source=row.x_source,
                    params=row.params,
                    average=average(row),
                )
            )
    sweep.sort(key=lambda p: (p.merge or "", str(p.params.get("target")), p.params.get("alpha", 0)))
