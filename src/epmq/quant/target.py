"""E-PMQ: expert-guided GPTQ with merged-weight anchoring (design.md section 2).

For one linear layer, expert weights W_i, per-task Grams H_i = X_i X_i^T / n_i, task weights
w_i and the merged weight W_m, E-PMQ solves

    min_Q  sum_i w_i ||Q X_i - W_i X_i||^2 / n_i  +  lam ||Q - W_m||^2,   Q on the grid.

Expanding the squares, this is  tr[(Q - W*) H (Q - W*)^T] + const  with

    S   = sum_i w_i H_i
    lam = alpha * mean(diag S)                 (scale-free anchor strength)
    H   = S + lam I
    W*  = (sum_i w_i W_i H_i + lam W_m) H^-1   (W_i C_i instead of W_i H_i with cross terms,
                                                C_i = X_i^expert X_i^T / n_i)

so E-PMQ is exactly GPTQ run on the target W* with Hessian H. alpha -> inf gives GPTQ of W_m,
alpha -> 0 (without rounding) gives the RegMean merge (sum_i W_i H_i)(sum_i H_i)^-1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from epmq.errors import EpmqError
from epmq.quant.checks import as_matrix, as_square, check_finite, working_dtype
from epmq.quant.gptq import gptq
from epmq.quant.grid import QuantGrid
from epmq.quant.result import QuantResult

logger = logging.getLogger(__name__)

MIN_RIDGE = 1e-6  # first ridge tried on a singular H, relative to mean(diag S)
MAX_RIDGE_RETRIES = 6  # ridge grows x10 per retry: up to 1e-1 * mean(diag S)


def epmq_target(
    expert_weights: Sequence[Tensor],
    grams: Sequence[Tensor],
    merged_weight: Tensor,
    *,
    alpha: float,
    task_weights: Sequence[float] | None = None,
    cross: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(W*, H)``: the E-PMQ target weight [out, in] and Hessian [in, in].

    Args:
        expert_weights: the K experts' weights of this layer, each [out, in].
        grams: per-task normalised Grams ``X_i X_i^T / n_i``, each [in, in].
        merged_weight: the merged weight W_m [out, in] (the anchor).
        alpha: anchor strength, ``lam = alpha * mean(diag(sum_i w_i H_i))``; >= 0.
        task_weights: w_i, default 1 each.
        cross: optional ``C_i = X_i^expert X_i^T / n_i`` (expert-activation targets).

    Float64 inputs give float64 outputs, otherwise float32. The solve uses a Cholesky
    factorisation of H (no explicit inverse). A singular H (alpha = 0 with rank-deficient
    Grams) gets the smallest ridge that makes it positive definite, logged. Raises
    :class:`EpmqError` naming the tensor on bad shapes or NaN/Inf.
    """
    k = len(expert_weights)
    if k == 0:
        raise EpmqError("epmq_target: expert_weights is empty")
    if len(grams) != k:
        raise EpmqError(f"epmq_target: got {k} expert_weights but {len(grams)} grams")
    if cross is not None and len(cross) != k:
        raise EpmqError(f"epmq_target: got {k} expert_weights but {len(cross)} cross terms")
    weights = [1.0] * k if task_weights is None else [float(v) for v in task_weights]
    if len(weights) != k:
        raise EpmqError(f"epmq_target: got {k} expert_weights but {len(weights)} task_weights")
    if not all(math.isfinite(v) and v >= 0 for v in weights) or sum(weights) <= 0:
        raise EpmqError(f"epmq_target: task_weights must be >= 0, not all 0, got {weights}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise EpmqError(f"epmq_target: alpha must be a finite number >= 0, got {alpha!r}")

    dtype = working_dtype(merged_weight, *expert_weights, *grams, *(cross or []))
    w_m = as_matrix(merged_weight, "merged_weight", dtype)
    rows, cols = w_m.shape
    dev = w_m.device  # experts and grams are moved (one at a time) to the merged weight's device

    # The inputs are not scanned for NaN/Inf one by one (that costs a quarter of the product
    # per expert): any NaN or Inf reaches S or B, which target_from_sums checks once.
    sums = TargetSums(rows, cols, dtype=dtype, device=dev)
    for i in range(k):
        w_i = as_matrix(expert_weights[i], f"expert_weights[{i}]", dtype, dev, finite=False)
        if w_i.shape != w_m.shape:
            raise EpmqError(
                f"expert_weights[{i}] has shape {tuple(w_i.shape)}, "
                f"merged_weight has {tuple(w_m.shape)}"
            )
        h_i = as_square(grams[i], f"grams[{i}]", cols, dtype, dev, finite=False)
        c_i = None
        if cross is not None:
            c_i = as_square(cross[i], f"cross[{i}]", cols, dtype, dev, finite=False)
        sums.add(h_i, w_i, cross=c_i, task_weight=weights[i])
    return target_from_sums(
        sums, w_m, alpha=alpha, on_non_finite=lambda: _name_non_finite(expert_weights, grams, cross)
    )


class TargetSums:
    """The two sums E-PMQ needs, folded one task at a time (design.md section 2):

        S = sum_i w_i H_i                and    B = sum_i w_i W_i H_i   (W_i C_i with cross terms)

    Folding each task's statistics as soon as they are complete keeps two matrices per
    linear ([in, in] and [out, in]) instead of K Grams (and K cross terms): the calibration
    engine's memory then does not grow with the number of experts. ``rows=0`` keeps S only
    (GPTQ and RTN need nothing else). The order of the additions is the order of the tasks,
    so folding while calibrating gives the same bits as folding the finished Grams afterwards.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.s = torch.zeros(cols, cols, dtype=dtype, device=device)
        self.b = torch.zeros(rows, cols, dtype=dtype, device=device) if rows else None
        self.tasks = 0

    def add(
        self,
        gram: Tensor,
        weight: Tensor | None = None,
        *,
        cross: Tensor | None = None,
        task_weight: float = 1.0,
    ) -> None:
        """Fold one task: ``S += w H_i`` and ``B += w W_i H_i`` (``W_i C_i`` given ``cross``).

        ``weight`` (the task's expert weight, or W_m for merged targets) is needed iff B is
        kept. Inputs are cast to the sums' dtype and device; shapes are the caller's to check.
        """
        self.s.add_(gram.to(self.s), alpha=task_weight)
        if self.b is not None:
            if weight is None:
                raise EpmqError("TargetSums.add: an expert weight is needed to fold B")
            product = gram if cross is None else cross
            self.b.addmm_(weight.to(self.b), product.to(self.b), alpha=task_weight)
        self.tasks += 1


def target_from_sums(
    sums: TargetSums,
    merged_weight: Tensor,
    *,
    alpha: float,
    on_non_finite: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(W*, H)`` from folded sums: ``H = S + lam I``, ``W* = (B + lam W_m) H^-1``.

    Consumes ``sums`` (S becomes H in place). ``on_non_finite`` is called (and should raise,
    naming the culprit) when S or B holds NaN/Inf; without it a generic error is raised.
    """
    s, b = sums.s, sums.b
    if b is None:
        raise EpmqError("target_from_sums: the sums were folded without B (rows=0)")
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(b).all())):
        if on_non_finite is not None:
            on_non_finite()
        raise EpmqError(
            "epmq_target: the folded statistics hold NaN/Inf (a calibration activation, a "
            "Gram or an expert weight was not finite)"
        )
    w_m = merged_weight.to(b)
    mean_diag = float(torch.diagonal(s).mean())
    if not mean_diag > 0:
        raise EpmqError("epmq_target: grams have no activation energy (mean of diag is 0)")
    lam = alpha * mean_diag
    h = s
    h.diagonal().add_(lam)
    b.add_(w_m, alpha=lam)

    # W* H = B  <=>  H W*^T = B^T (H symmetric): Cholesky H = L L^T, two triangular solves.
    # A singular H (alpha = 0 with rank-deficient Grams: fewer tokens than inputs, dead
    # inputs) gets the smallest ridge that makes it positive definite, starting at
    # MIN_RIDGE * mean(diag S) and growing x10; the run logs it. H keeps the ridge.
    chol, info = torch.linalg.cholesky_ex(h)
    ridge = MIN_RIDGE
    for _ in range(MAX_RIDGE_RETRIES):
        if int(info) == 0:
            break
        h.diagonal().add_(ridge * mean_diag)
        b.add_(w_m, alpha=ridge * mean_diag)  # the ridge anchors to W_m like lam does
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            logger.warning(
                "epmq_target: H not positive definite at alpha=%g; added ridge %g * mean(diag)",
                alpha,
                ridge,
            )
            break
        ridge *= 10
    if int(info) != 0:
        raise EpmqError(
            f"epmq_target: H = sum_i w_i grams[i] + lam I is not positive definite "
            f"(alpha={alpha:g}) even with a ridge of {ridge / 10:g} * mean(diag); use alpha > 0"
        )
    target = torch.cholesky_solve(b.T, chol).T.contiguous()
    sums.b = None  # consumed: B now holds B + lam W_m
    return target, h


def _name_non_finite(
    expert_weights: Sequence[Tensor], grams: Sequence[Tensor], cross: Sequence[Tensor] | None
) -> None:
    """Raise naming the first input holding NaN/Inf (S or B came out non-finite)."""
    named = [("expert_weights", expert_weights), ("grams", grams), ("cross", cross or [])]
    for label, tensors in named:
        for i, t in enumerate(tensors):
            check_finite(t, f"{label}[{i}]")
    raise EpmqError(
        "epmq_target: sum_i w_i W_i H_i overflowed to Inf from finite inputs; rescale the "
        "statistics or use float64"
    )


def epmq(
    expert_weights: Sequence[Tensor],
    grams: Sequence[Tensor],
    merged_weight: Tensor,
    grid: QuantGrid,
    *,
    alpha: float,
    task_weights: Sequence[float] | None = None,
    cross: Sequence[Tensor] | None = None,
    **gptq_kwargs: Any,
) -> QuantResult:
    """E-PMQ: :func:`gptq` on ``(W*, H) = epmq_target(...)``.

    ``proxy_loss`` in the result is ``tr[(Q - W*) H (Q - W*)^T]``, which equals the E-PMQ
    objective up to a constant that does not depend on Q. ``seconds`` includes the target.
    """
    start = time.perf_counter()
    target, h = epmq_target(
        expert_weights, grams, merged_weight, alpha=alpha, task_weights=task_weights, cross=cross
    )
    result = gptq(target, h, grid, **gptq_kwargs)
    result.seconds = time.perf_counter() - start
    return result
