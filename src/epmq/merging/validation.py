"""Input checks before any merging work: keys, shapes, dtypes, Grams, and finite values.

Every expert must have the base's keys (among the merged parameters), shapes and dtypes.
Floating-point dtypes may differ (e.g. a bf16 expert of an fp32 base): that is logged, the
merge runs in float32 (float64 for a float64 base) and the result is written in the base's
dtype. A non-float dtype mismatch (e.g. int64 vs int32 buffers) is an error. Errors name the
expert and the tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from epmq.errors import EpmqError
from epmq.merging.selection import Selection

log = logging.getLogger("epmq.merging")


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor (read from a header, no data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(tensor.shape), tensor.dtype)


def check_structure(
    base: Mapping[str, TensorMeta],
    experts: Sequence[Mapping[str, TensorMeta]],
    expert_names: Sequence[str],
    selection: Selection,
) -> list[str]:
    """Validate every expert against the base; return the names to merge, in base order."""
    if not experts:
        raise EpmqError("no experts given; merging needs at least one expert")
    if len(expert_names) != len(experts):
        raise EpmqError(f"{len(expert_names)} expert names for {len(experts)} experts")
    selected = selection.check(base)
    for label, meta in zip(expert_names, experts, strict=True):
        missing = [n for n in selected if n not in meta]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise EpmqError(f"{label}: missing tensor {missing[0]!r}{more} that the base has")
        extra = [n for n in meta if n not in base and selection(n)]
        if extra:
            raise EpmqError(f"{label}: has tensor {extra[0]!r} that the base does not have")
        cast = 0
        for name in selected:
            want, got = base[name], meta[name]
            if got.shape != want.shape:
                raise EpmqError(
                    f"{label}: tensor {name!r} has shape {list(got.shape)}, "
                    f"base has {list(want.shape)}"
                )
            if got.dtype != want.dtype:
                if not (got.dtype.is_floating_point and want.dtype.is_floating_point):
                    raise EpmqError(
                        f"{label}: tensor {name!r} has dtype {got.dtype}, base has {want.dtype}"
                    )
                cast += 1
        if cast:
            log.info(
                "%s: %d tensors differ from the base's float dtype; merged in float32, "
                "written in the base's dtype",
                label,
                cast,
            )
    return selected


def check_grams(
    grams: Mapping[str, Sequence[torch.Tensor]] | None,
    base: Mapping[str, TensorMeta],
    selected: Sequence[str],
    num_experts: int,
) -> None:
    """Gram keys name 2-D merged weights and hold one Gram per expert (shapes checked later)."""
    if grams is None:
        return
    chosen = set(selected)
    for name in grams:
        if name not in base:
            raise EpmqError(f"grams: {name!r} is not a parameter of the base model")
        if name not in chosen:
            log.debug("grams: %s is not merged; its Grams are ignored", name)
            continue
        if len(base[name].shape) != 2:
            raise EpmqError(
                f"grams: {name!r} has shape {list(base[name].shape)}; Grams apply to 2-D "
                "linear weights (d_out x d_in)"
            )
        if len(grams[name]) != num_experts:
            raise EpmqError(
                f"grams: {name!r} has {len(grams[name])} Gram matrices for {num_experts} experts"
            )


def gram_list(
    grams: Mapping[str, Sequence[torch.Tensor]], name: str, shape: tuple[int, ...]
) -> list[torch.Tensor]:
    """The per-task Grams of one weight, checked: (d_in, d_in) each, finite."""
    result = []
    d_in = shape[-1]
    for i, gram in enumerate(grams[name]):
        if tuple(gram.shape) != (d_in, d_in):
            raise EpmqError(
                f"grams: {name!r} task {i} has shape {list(gram.shape)}, expected [{d_in}, {d_in}]"
            )
        check_finite(gram, f"grams (task {i})", name)
        result.append(gram)
    return result


def check_finite(tensor: torch.Tensor, label: str, name: str) -> None:
    """Raise :class:`EpmqError` naming ``label`` and tensor ``name`` on NaN or Inf values."""
    if not tensor.dtype.is_floating_point:
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise EpmqError(f"{label}: tensor {name!r} has {bad} non-finite values ({kind} among them)")
