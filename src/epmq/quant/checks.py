"""Input validation shared by the solvers: shapes, dtypes and finiteness.

Every check raises :class:`epmq.errors.EpmqError` naming the tensor that is wrong, so a NaN
coming out of a merge or a calibration pass is reported where it enters the solver instead
of spreading silently into the quantized weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epmq.errors import EpmqError


def working_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (solvers never run below float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_finite(t: Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or Inf, saying which (one pass over ``t`` when it is finite).

    A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum (one reduction, no
    temporary) clears ``t``; only a sum that overflowed on finite values needs a second look.
    """
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return
    raise EpmqError(f"{name} contains {'NaN' if bool(torch.isnan(t).any()) else 'Inf'}")


def as_matrix(
    t: Tensor,
    name: str,
    dtype: torch.dtype,
    device: torch.device | None = None,
    *,
    finite: bool = True,
) -> Tensor:
    """Validate a 2-D floating tensor; return it detached, as ``dtype`` on ``device``.

    No copy is made when dtype and device already match; callers clone before writing.
    ``finite=False`` skips the NaN/Inf scan, for callers that check a result computed from
    ``t`` instead (a NaN or Inf in ``t`` always reaches it) and then name the culprit.
    """
    if not isinstance(t, Tensor):
        raise EpmqError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise EpmqError(f"{name} must be 2-D [out, in], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise EpmqError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        raise EpmqError(f"{name} is empty (shape {tuple(t.shape)})")
    if finite:
        check_finite(t, name)
    return t.detach().to(device=device, dtype=dtype)


def as_square(
    t: Tensor,
    name: str,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
    *,
    finite: bool = True,
) -> Tensor:
    """Validate a [dim, dim] matrix (a Hessian, Gram or cross statistic)."""
    t = as_matrix(t, name, dtype, device, finite=finite)
    if t.shape != (dim, dim):
        raise EpmqError(f"{name} must have shape ({dim}, {dim}), got {tuple(t.shape)}")
    return t
