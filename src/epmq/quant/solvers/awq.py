"""AWQ: activation-aware weight quantization (Lin et al., 2024), as llm-compressor's AWQModifier.

Linears that read one input share a per-input-channel scale ``s``; each is rounded to nearest
as ``Q = RTN(W · diag(s))`` and the model computes ``Q · (x / s)``::

    a_j = sqrt(S_jj)                       RMS of input channel j (S = Σ_i w_i H_i)
    s_j = a_j^β / sqrt(max_k a_k^β · min_k a_k^β)        normalised around 1, as AutoAWQ
    L(β) = Σ_l tr[(Q_l diag(s)⁻¹ − W_l) S (Q_l diag(s)⁻¹ − W_l)ᵀ]   (l: the linears of the input)

β is searched on ``{0, 1/n, ..., (n−1)/n}`` (n = ``n_grid``); β = 0 is ``s = 1``, plain RTN, so
``L(β*) ≤ L_RTN`` for every group of linears. ``duo_scaling`` divides ``a^β`` by
``m^(1−β)``, ``m_j`` the mean over rows of ``|W_rj|`` over its row-group max-abs (llm-compressor's
default). ``a`` is the RMS, not the paper's mean ``|x_j|``: the RMS is what the folded statistics
hold (no new statistic); for channels whose distributions differ only in scale, RMS and mean
``|x|`` differ by one common factor, which the normalisation removes.

Exactness: ``diag(s)⁻¹`` is never kept in the layer. The engine divides the output channels of
the module producing the input (a norm's weight and bias, or the rows of the linear before,
whose grid scales are divided) by ``s`` (``BlockAdapter.input_producers``); linears whose input
no such module produces are solved with ``s = 1`` (plain RTN). Every weight written is
``dequantize(codes, scales, zeros, g_idx)`` of ``Q``, bit for bit, and exports as RTN's does.

``clip`` (off by default) then searches, per row and group, a shrink ``f`` of the min-max range
on ``{1, 1 − max_shrink/n, ...}`` minimising the group's own output error
``d_g S'_gg d_gᵀ`` (``S' = diag(s)⁻¹ S diag(s)⁻¹``, the Gram of ``x / s``), as AutoAWQ's clipping.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from epmq.params import Param
from epmq.quant.grid import QuantGrid
from epmq.quant.loss import proxy_loss
from epmq.quant.result import QuantResult, build_result
from epmq.quant.rtn import rtn
from epmq.quant.solvers.registry import LayerProblem, LayerSolution, register_solver, solution_of

PARAMS = (
    Param("n_grid", int, 20, "points of the scale exponent grid {0, 1/n, ..., (n-1)/n}", low=1),
    Param("duo_scaling", bool, False, "divide a^β by the weights' mean magnitude^(1-β)"),
    Param("clip", bool, False, "search a per-group shrink of the min-max range"),
    Param("max_shrink", float, 0.5, "largest range shrink the clipping tries", low=0.0, high=0.99),
)


def weight_magnitude(weights: Tensor, grid: QuantGrid) -> Tensor:
    """``m_j``: mean over rows of ``|W_rj|`` divided by its row-group max-abs (duo scaling)."""
    width = weights.shape[1] if grid.group_size == -1 else grid.group_size
    groups = weights.abs().reshape(-1, width)
    normed = groups / (groups.amax(dim=1, keepdim=True) + 1e-6)
    return normed.reshape(weights.shape).mean(dim=0)


def channel_scale(rms: Tensor, beta: float, magnitude: Tensor | None) -> Tensor:
    """``s = a^β (/ m^(1−β))``, clamped and normalised by ``sqrt(max · min)``."""
    s = rms.pow(beta)
    if magnitude is not None:
        s = s / (magnitude.pow(1 - beta) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_loss(weight: Tensor, hessian: Tensor, grid: QuantGrid, s: Tensor) -> float:
    """``tr[(RTN(W diag s) diag(s)⁻¹ − W) S (…)ᵀ]``: one layer's output error with scale ``s``."""
    return proxy_loss(rtn(weight * s, grid).weight / s, weight, hessian)


def search_scale(
    problems: Sequence[LayerProblem], grid: QuantGrid | None, params: Mapping[str, Any]
) -> Tensor | None:
    """The ``s`` minimising ``L(β)`` summed over the linears reading one input (None: β = 0)."""
    assert grid is not None and problems[0].sums is not None
    hessian = problems[0].sums.s.float()
    rms = hessian.diagonal().clamp(min=0).sqrt()
    weights = [p.merged.float() for p in problems]
    stacked = torch.cat(weights)
    magnitude = weight_magnitude(stacked, grid) if params["duo_scaling"] else None
    best, best_loss = (
        None,
        sum(scaled_loss(w, hessian, grid, torch.ones_like(rms)) for w in weights),
    )
    for i in range(1, params["n_grid"]):
        s = channel_scale(rms, i / params["n_grid"], magnitude)
        loss = sum(scaled_loss(w, hessian, grid, s) for w in weights)
        if loss < best_loss:  # strict: ties keep the smaller β (β = 0 first)
            best, best_loss = s, loss
    return best


def clipped_rtn(
    weight: Tensor, hessian: Tensor, grid: QuantGrid, steps: int, max_shrink: float
) -> tuple[Tensor, Tensor]:
    """RTN with each row-group's range ``[f·min, f·max]``, ``f`` minimising ``d_g H_gg d_gᵀ``."""
    rows, cols = weight.shape
    width = cols if grid.group_size == -1 else grid.group_size
    n_groups = cols // width
    groups = weight.reshape(rows * n_groups, width)
    blocks = torch.stack([hessian[g * width : (g + 1) * width, g * width : (g + 1) * width]
                          for g in range(n_groups)])  # fmt: skip
    lo, hi = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    best_loss = torch.full(
        (rows * n_groups,), float("inf"), dtype=weight.dtype, device=weight.device
    )
    best_scale = torch.empty_like(best_loss)
    best_zero = torch.empty_like(best_scale)
    for i in range(steps):  # i = 0: the full range (plain RTN)
        f = 1.0 - max_shrink * i / steps
        scale, zero = grid.fit(groups.clamp(lo * f, hi * f))
        d = grid.dequantize(grid.quantize(groups, scale, zero), scale, zero) - groups
        d = d.view(rows, n_groups, width)
        loss = torch.einsum("rgi,gij,rgj->rg", d, blocks, d).reshape(-1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def awq_quantize(
    weight: Tensor, hessian: Tensor, grid: QuantGrid, s: Tensor | None, params: Mapping[str, Any]
) -> QuantResult:
    """``Q = RTN(W diag s)`` (clipped when asked): the on-grid weight the layer holds."""
    start = time.perf_counter()
    w, h = weight.float(), hessian.float()
    if s is not None:
        w, h = w * s, h / s[:, None] / s[None, :]  # W diag(s) reads x / s, whose Gram is S'
    if params["clip"]:
        rows, cols = w.shape
        scale, zero = clipped_rtn(w, h, grid, params["n_grid"], params["max_shrink"])
        width = cols if grid.group_size == -1 else grid.group_size
        codes = grid.quantize(w.reshape(-1, width), scale, zero).view(rows, cols)
        g_idx = torch.arange(cols, device=w.device) // width
        result = build_result(
            codes, scale.view(rows, -1), zero.view(rows, -1), g_idx, grid, target=w, hessian=h,
            damping=0.0, damping_retries=0, start=start,
        )  # fmt: skip
    else:
        result = rtn(w, grid)
    # the reported loss, in the layer's own terms: tr[(Q diag(s)⁻¹ − W) S (…)ᵀ]
    unscaled = result.weight if s is None else result.weight / s
    result.proxy_loss = proxy_loss(unscaled, weight.float(), hessian.float())
    result.seconds = time.perf_counter() - start
    return result


@register_solver(
    "awq",
    params=PARAMS,
    summary="AWQ: RTN after per-input-channel scales searched on the activations",
    input_scales=search_scale,
)
def awq_solver(
    problem: LayerProblem, grid: QuantGrid | None, params: Mapping[str, Any]
) -> LayerSolution:
    assert grid is not None and problem.sums is not None
    return solution_of(
        awq_quantize(problem.merged, problem.sums.s, grid, problem.input_scale, params)
    )
