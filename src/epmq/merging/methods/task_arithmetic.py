"""Task arithmetic: W = W_0 + s Σ_i (W_i − W_0)."""

from __future__ import annotations

import torch

from epmq.merging.registry import Param, TensorContext, register_method


@register_method(
    "task_arithmetic",
    params=[Param("scale", float, 0.3, "scaling s of the summed task vectors")],
    summary="base plus scale times the sum of task vectors (W_i - W_0)",
)
def task_arithmetic(
    base: torch.Tensor,
    experts: torch.Tensor,
    ctx: TensorContext,
    *,
    scale: float,
) -> torch.Tensor:
    """Base plus scale times the sum of task vectors."""
    merged = experts.sum(0)
    merged.sub_(base, alpha=experts.shape[0])
    return merged.mul_(scale).add_(base)
