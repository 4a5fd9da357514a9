"""The layer-wise proxy loss that GPTQ and E-PMQ minimise."""

from __future__ import annotations

import torch
from torch import Tensor

from epmq.errors import EpmqError


def proxy_loss(q: Tensor, w: Tensor, hessian: Tensor) -> float:
    """``tr[(Q - W) H (Q - W)^T]`` = sum over rows of ``d H d^T`` with ``d = q - w``.

    With ``H = X X^T / n`` this is the mean squared output error ``||Q X - W X||^2 / n``.
    Computed in float64 if any input is float64, else float32, accumulated in float64.
    """
    if q.shape != w.shape:
        raise EpmqError(f"proxy_loss: q has shape {tuple(q.shape)}, w has {tuple(w.shape)}")
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise EpmqError(
            f"proxy_loss: hessian must be ({w.shape[1]}, {w.shape[1]}), got {tuple(hessian.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (q.dtype, w.dtype, hessian.dtype) else torch.float32
    d = q.detach().to(dtype) - w.detach().to(device=q.device, dtype=dtype)
    h = hessian.detach().to(device=q.device, dtype=dtype)
    return float(((d @ h) * d).sum(dtype=torch.float64))
