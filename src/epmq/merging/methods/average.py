"""Simple or weighted average of the experts' weights: W = Σ_i w_i W_i / Σ_i w_i."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from epmq.errors import EpmqError
from epmq.merging.registry import Param, TensorContext, register_method


def _check(params: Mapping[str, Any], num_experts: int) -> None:
    weights = params["weights"]
    if weights is None:
        return
    if len(weights) != num_experts:
        raise EpmqError(
            f"method 'average': parameter 'weights' has {len(weights)} values for "
            f"{num_experts} experts"
        )
    if sum(weights) == 0:
        raise EpmqError("method 'average': parameter 'weights' sums to zero")


@register_method(
    "average",
    params=[
        Param(
            "weights",
            list,
            None,
            "one weight per expert, normalised to sum 1; default uniform",
        )
    ],
    summary="(weighted) average of the expert weights; the base is not used",
    check=_check,
)
def average(
    base: torch.Tensor,
    experts: torch.Tensor,
    ctx: TensorContext,
    *,
    weights: list[float] | None,
) -> torch.Tensor:
    """(Weighted) average of the expert weights."""
    if weights is None:
        return experts.mean(0)
    w = torch.tensor(weights, dtype=experts.dtype) / sum(weights)
    return torch.tensordot(w, experts, dims=1)
