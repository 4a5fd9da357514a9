"""Bias correction: the bias that best reproduces the targets' outputs once the weight is solved.

For one linear with solved weight ``Q``, per-task mean inputs ``μ_i`` (the stream being
calibrated) and ``μ̃_i`` (the targets' inputs: the expert's own with the expert stream, else
``μ_i``), target weights and biases ``W_i, b_i`` (each task's expert, or the merged ``W_m, b_m``
for solvers without expert targets) and task weights ``w_i``::

    min_b  Σ_i w_i · mean_t ‖Q x_t^(i) + b − (W_i x̃_t^(i) + b_i)‖²
    b = Σ_i w_i (W_i μ̃_i + b_i − Q μ_i) / Σ_i w_i

(the gradient in ``b`` is ``2 Σ_i w_i (Q μ_i + b − W_i μ̃_i − b_i)``: only the means enter).
For GPTQ (targets ``W_m x + b_m``) this is ``b_m + (W_m − Q) μ̄``: it undoes the mean shift of
the rounding. Computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from epmq.errors import EpmqError


def corrected_bias(
    weight: Tensor,
    means: Sequence[Tensor],
    targets: Sequence[tuple[Tensor, Tensor]],
    *,
    target_means: Sequence[Tensor] | None = None,
    task_weights: Sequence[float] | None = None,
) -> Tensor:
    """``b = Σ_i w_i (W_i μ̃_i + b_i − Q μ_i) / Σ_i w_i`` (module docs), float64 [out].

    Args:
        weight: the solved weight ``Q`` [out, in].
        means: per-task mean inputs ``μ_i`` [in].
        targets: per task ``(W_i, b_i)`` ([out, in], [out]).
        target_means: per-task ``μ̃_i`` (None: ``μ_i``).
        task_weights: ``w_i`` (default 1 each); their sum must be > 0.
    """
    k = len(means)
    tilde = means if target_means is None else target_means
    weights = [1.0] * k if task_weights is None else [float(w) for w in task_weights]
    if len(targets) != k or len(tilde) != k or len(weights) != k:
        raise EpmqError(
            f"bias correction: {k} mean inputs, {len(targets)} targets, {len(tilde)} target "
            f"means and {len(weights)} task weights"
        )
    total = sum(weights)
    if not total > 0:
        raise EpmqError(f"bias correction: the task weights sum to {total}, not > 0")
    q = weight.to(torch.float64)
    mean_in = sum(w * m.to(q) for w, m in zip(weights, means, strict=True))
    out = -(q @ mean_in)
    for w, (w_i, b_i), mu in zip(weights, targets, tilde, strict=True):
        out = out + w * (w_i.to(q) @ mu.to(q) + b_i.to(q))
    return out / total
