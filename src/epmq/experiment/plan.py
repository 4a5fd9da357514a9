"""The plan of an experiment: every model variant a config asks for, in run order.

Pure bookkeeping, no tensors: a config's merges × quantizers × bits × group sizes, the
E-PMQ continuous targets, the X-source study and the α sweep (both on the first merge) become
a flat list of :class:`Variant` s grouped by merge, so the runner is one loop and tests can
check the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from epmq.experiment.config import ExperimentConfig

SWEEP = "alpha"


@dataclass(frozen=True)
class Variant:
    """One model to build from a merge and evaluate.

    ``kind`` is ``"merged"`` (the full-precision merge), ``"target"`` (E-PMQ's unrounded
    W*), or ``"quantized"``. ``sweep`` names the sweep a variant belongs to (it is then
    reported as a sweep point, not a table row).
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
    def name(self) -> str:
        if self.kind == "merged":
            return self.merge
        if self.kind == "target":
            return f"{self.merge} + E-PMQ target W* (α={self.alpha:g}, unrounded)"
        group = "" if self.group_size in (None, -1) else f" g{self.group_size}"
        label = f"{self.merge} + {self.quantizer} w{self.bits}{group}"
        if self.quantizer == "epmq":
            extras = [f"α={self.alpha:g}"]
            if self.x_source != "quantized":
                extras.append(f"X={self.x_source}")
            if self.target == "merged":
                extras.append("merged targets")
            label += f" ({', '.join(extras)})"
        return label


def plan_experiment(config: ExperimentConfig) -> list[Variant]:
    """Every variant of ``config``, grouped by merge, each listed once."""
    q = config.quantization
    variants: list[Variant] = []
    for number, merge in enumerate(config.merges):
        name = merge.method
        studied = number == 0  # the X-source study and the α sweep run on the first merge
        variants.append(Variant(merge=name, kind="merged"))
        epmq = Variant(
            merge=name,
            kind="quantized",
            quantizer="epmq",
            alpha=q.alpha,
            x_source=q.x_source,
            target=q.target,
        )
        if "epmq" in q.methods and q.evaluate_target:
            variants.append(replace(epmq, kind="target"))
        for bits in q.bits:
            for group in q.group_sizes:
                for method in q.methods:
                    if method == "epmq":
                        variants.append(replace(epmq, bits=bits, group_size=group))
                    else:
                        variants.append(
                            Variant(
                                merge=name,
                                kind="quantized",
                                quantizer=method,
                                bits=bits,
                                group_size=group,
                            )
                        )
        study_bits, study_group = min(q.bits), q.group_sizes[0]
        if "epmq" in q.methods and q.x_source_study and studied:
            for source in ("quantized", "merged", "expert"):
                if source != q.x_source:
                    variants.append(
                        replace(epmq, bits=study_bits, group_size=study_group, x_source=source)
                    )
        for alpha in q.alpha_sweep if studied and "epmq" in q.methods else []:
            for target in ("expert", "merged"):
                variants.append(
                    replace(
                        epmq,
                        bits=study_bits,
                        group_size=study_group,
                        alpha=alpha,
                        target=target,
                        sweep=SWEEP,
                    )
                )
    return _dedupe(variants)


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
