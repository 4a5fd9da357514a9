"""RegMean (Jin et al. 2023): per linear layer, the weights that best reproduce every expert's
outputs on its own data.

For a weight of shape (d_out, d_in) with per-task Gram matrices G_i (d_in × d_in, e.g.
X_iᵀX_i or its per-sample mean, as computed by :class:`epmq.quant.GramAccumulator`)::

    G̃_i = r·G_i + (1 − r)·diag(G_i)          (off-diagonals scaled by reduce_ratio r)
    W   = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹

solved with a Cholesky factorisation in float64, never an explicit inverse. If Σ G̃_i is
singular (Cholesky fails, or a pivot is below 1e-12 of the largest diagonal entry, e.g. dead
inputs or fewer samples than inputs), a ridge ε·I is added and pulled toward the simple
average: W = (Σ W_i G̃_i + ε W̄)(Σ G̃_i + ε I)⁻¹, with ε = 1e-8·mean(diag) raised ×10 until
the factorisation succeeds; a warning names the tensor and ε. Parameters without Grams
(biases, norms, embeddings) are averaged.
"""

from __future__ import annotations

import logging

import torch

from epmq.merging.registry import Param, TensorContext, register_method

# Default scale of the Gram off-diagonals (the RegMean paper's alpha), shared by the engine.
REDUCE_RATIO = 0.95
log = logging.getLogger("epmq.merging")


def _factor(matrix: torch.Tensor) -> torch.Tensor | None:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return None
    pivots = torch.diagonal(factor) ** 2
    if float(pivots.min()) <= 1e-12 * float(torch.diagonal(matrix).max()):
        return None
    return factor


def solve_regmean(
    weights: torch.Tensor, grams: list[torch.Tensor], reduce_ratio: float, name: str = ""
) -> torch.Tensor:
    """RegMean solution for stacked weights ``(K, d_out, d_in)`` and K Grams (d_in, d_in)."""
    d_in = weights.shape[-1]
    device = weights.device  # solved where the weights are (float64 on a GPU too)
    lhs = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    rhs = torch.zeros(weights.shape[1:], dtype=torch.float64, device=device)
    for weight, gram in zip(weights, grams, strict=True):
        g = gram.to(device=device, dtype=torch.float64)
        reduced = g * reduce_ratio
        reduced.diagonal().copy_(g.diagonal())
        lhs += reduced
        rhs += weight.to(torch.float64) @ reduced
    factor = _factor(lhs)
    if factor is None:
        scale = float(lhs.diagonal().mean())
        eps = 1e-8 * (scale if scale > 0 else 1.0)
        mean_weight = weights.to(torch.float64).mean(0)
        while factor is None:
            factor = _factor(lhs + eps * torch.eye(d_in, dtype=torch.float64, device=device))
            if factor is None:
                eps *= 10
        log.warning(
            "regmean: Gram sum of %s is singular; added ridge %.3g toward the average", name, eps
        )
        rhs += eps * mean_weight
    return torch.cholesky_solve(rhs.T, factor).T.to(weights.dtype)


#: RegMean's parameters, declared once for the merge and the layer-wise solver
#: (:mod:`epmq.quant.solvers.regmean`)
PARAMS = (
    Param(
        "reduce_ratio",
        float,
        REDUCE_RATIO,
        "scale of the Gram off-diagonals (1 = plain RegMean, 0 = diagonal)",
        low=0.0,
        high=1.0,
    ),
)


@register_method(
    "regmean",
    params=PARAMS,
    summary="per linear weight W = (sum W_i G_i)(sum G_i)^-1 from per-task Grams; rest averaged",
    requires_grams=True,
)
def regmean(
    base: torch.Tensor,
    experts: torch.Tensor,
    ctx: TensorContext,
    *,
    reduce_ratio: float,
) -> torch.Tensor:
    """RegMean on weights with Grams; plain average elsewhere."""
    if ctx.grams is None:
        return experts.mean(0)
    return solve_regmean(experts, list(ctx.grams), reduce_ratio, ctx.name)
