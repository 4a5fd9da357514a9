"""The merge engine: a validated plan applied one parameter at a time.

:class:`MergePlan` holds the resolved method and parameters, the merged names and the per-task
extras; :meth:`MergePlan.merge_tensor` merges one parameter from tensors loaded on demand.
Both the in-memory :func:`merge` and the streaming :func:`epmq.merging.merge_checkpoints` use
it, so they give the same result bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epmq.errors import EpmqError
from epmq.merging.registry import MergeMethod, TensorContext, get_method
from epmq.merging.selection import Selection
from epmq.merging.topk import global_thresholds
from epmq.merging.validation import (
    TensorMeta,
    check_finite,
    check_grams,
    check_structure,
    gram_list,
)

Loader = Callable[[str], torch.Tensor]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class MergePlan:
    """Everything needed to merge one parameter, validated up front."""

    method: MergeMethod
    params: dict[str, Any]
    base_meta: Mapping[str, TensorMeta]
    selected: list[str]
    expert_names: list[str]
    grams: Mapping[str, Sequence[torch.Tensor]] | None = None
    thresholds: tuple[float, ...] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def is_merged(self, name: str) -> bool:
        """Merged by the method (selected and floating point); else the base value is kept."""
        return name in self._merged

    def __post_init__(self) -> None:
        chosen = set(self.selected)
        self._merged = {
            n for n, m in self.base_meta.items() if n in chosen and m.dtype.is_floating_point
        }

    def compute_thresholds(self, base: Loader, experts: Sequence[Loader]) -> None:
        """First pass for global top-k methods: exact per-task thresholds over merged tensors."""
        density = self.method.global_density(self.params)
        if density is None:
            return
        names = [n for n in self.selected if self.is_merged(n)]
        checked: set[str] = set()  # NaN/Inf checks on the first of the two passes only

        def task_vectors(name: str) -> Iterator[torch.Tensor]:
            check = name not in checked
            checked.add(name)
            dtype = _work_dtype(self.base_meta[name].dtype)
            base_t = base(name)
            if check:
                check_finite(base_t, "base", name)
            base_t = base_t.to(dtype)
            for label, load in zip(self.expert_names, experts, strict=True):
                tensor = load(name)
                if check:
                    check_finite(tensor, label, name)
                yield tensor.to(dtype) - base_t

        self.thresholds = global_thresholds(names, task_vectors, self.num_experts, density)

    def merge_tensor(self, name: str, base: Loader, experts: Sequence[Loader]) -> torch.Tensor:
        """Merged value of parameter ``name`` in the base's dtype (the base's own tensor when
        the parameter is not merged). Loads one base tensor and one tensor per expert."""
        base_t = base(name)
        check_finite(base_t, "base", name)
        if not self.is_merged(name):
            return base_t
        dtype = _work_dtype(base_t.dtype)
        stacked = torch.empty((self.num_experts, *base_t.shape), dtype=dtype)
        for i, (label, load) in enumerate(zip(self.expert_names, experts, strict=True)):
            tensor = load(name)
            check_finite(tensor, label, name)
            stacked[i].copy_(tensor)
            del tensor
        grams = None
        if self.grams is not None and name in self.grams:
            grams = gram_list(self.grams, name, tuple(base_t.shape))
        ctx = TensorContext(name=name, thresholds=self.thresholds, grams=grams)
        merged = self.method.fn(base_t.to(dtype), stacked, ctx, **self.params)
        check_finite(merged, f"merge result of {self.method.name!r}", name)
        merged = merged.to(base_t.dtype)  # a float16/bfloat16 base can overflow here
        if merged.dtype != dtype:
            where = f"merge result of {self.method.name!r} in the base's {base_t.dtype}"
            check_finite(merged, where, name)
        return merged

    def record(self) -> dict[str, Any]:
        """Plain-data description for ``merge_record.json``."""
        return {
            "method": self.method.name,
            "params": self.params,
            "merged_tensors": sorted(self._merged),
            "kept_from_base": sorted(set(self.base_meta) - self._merged),
            "global_thresholds": list(self.thresholds) if self.thresholds is not None else None,
            "grams": sorted(n for n in (self.grams or {}) if self.is_merged(n)),
        }


def make_plan(
    method: str,
    params: Mapping[str, Any],
    base_meta: Mapping[str, TensorMeta],
    experts_meta: Sequence[Mapping[str, TensorMeta]],
    expert_names: Sequence[str],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    grams: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> MergePlan:
    """Resolve the method and its parameters and validate all inputs (no tensor data read)."""
    spec = get_method(method)
    resolved = spec.resolve(params, len(experts_meta))
    selected = check_structure(
        base_meta, experts_meta, expert_names, Selection.of(include, exclude)
    )
    if grams is not None and not spec.uses_grams:
        raise EpmqError(f"method {method!r} does not use Gram matrices; drop grams=...")
    if grams is None and spec.requires_grams:
        raise EpmqError(
            f"method {method!r} needs per-task Gram matrices (grams=... keyed by weight name, "
            "or --grams FILE written by epmq.merging.grams.save_grams; computed by epmq.calib)"
        )
    check_grams(grams, base_meta, selected, len(experts_meta))
    return MergePlan(spec, resolved, base_meta, selected, list(expert_names), grams)


def merge(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    grams: Mapping[str, Sequence[torch.Tensor]] | None = None,
    expert_names: Sequence[str] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with a registered method.

    ``merge(base, experts, "ties", density=0.2, merge_func="sum", scale=0.3)``. Parameters not
    selected by ``include``/``exclude`` (glob patterns, see :mod:`epmq.merging.selection`) and
    non-float buffers are the base's own tensors (not copies). Inputs are never modified.
    ``expert_names`` label experts in error messages (default ``expert 0``, ``expert 1``...).
    """
    names = list(expert_names or [f"expert {i}" for i in range(len(experts))])
    plan = make_plan(
        method,
        params,
        {n: TensorMeta.of(t) for n, t in base.items()},
        [{n: TensorMeta.of(t) for n, t in e.items()} for e in experts],
        names,
        include=include,
        exclude=exclude,
        grams=grams,
    )
    base_load = base.__getitem__
    expert_loads = [e.__getitem__ for e in experts]
    for name in base:
        check_finite(base[name], "base", name)
    for label, expert in zip(names, experts, strict=True):
        for name in plan.selected:
            check_finite(expert[name], label, name)
    plan.compute_thresholds(base_load, expert_loads)
    return {name: plan.merge_tensor(name, base_load, expert_loads) for name in base}
