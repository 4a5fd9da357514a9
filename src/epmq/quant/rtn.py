"""Round-to-nearest: the baseline every solver is compared against."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from epmq.quant.checks import as_matrix, as_square, working_dtype
from epmq.quant.grid import QuantGrid
from epmq.quant.result import QuantResult, build_result


def rtn(weight: Tensor, grid: QuantGrid, hessian: Tensor | None = None) -> QuantResult:
    """Round every weight to the nearest point of its row/group min-max grid.

    ``hessian`` is only used to report ``proxy_loss`` (``nan`` without it).
    """
    start = time.perf_counter()
    dtype = working_dtype(weight, hessian)
    w = as_matrix(weight, "weight", dtype)
    rows, cols = w.shape
    n_groups = grid.n_groups(cols)
    dev = w.device
    h = None if hessian is None else as_square(hessian, "hessian", cols, dtype, dev)

    width = cols if grid.group_size == -1 else grid.group_size
    scales = torch.empty(rows, n_groups, dtype=dtype, device=dev)
    zeros = torch.empty(rows, n_groups, dtype=dtype, device=dev)
    codes = torch.empty(rows, cols, dtype=dtype, device=dev)
    for g in range(n_groups):
        cols_g = slice(g * width, (g + 1) * width)
        scales[:, g], zeros[:, g] = grid.fit(w[:, cols_g])
        codes[:, cols_g] = grid.quantize(w[:, cols_g], scales[:, g], zeros[:, g])
    g_idx = torch.arange(cols, device=dev) // width
    return build_result(
        codes, scales, zeros, g_idx, grid, target=w, hessian=h,
        damping=0.0, damping_retries=0, start=start,
    )  # fmt: skip
