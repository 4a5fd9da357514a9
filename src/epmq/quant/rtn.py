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
    groups = w.reshape(rows * n_groups, width)  # row r of group g is row r * n_groups + g
    scale, zero = grid.fit(groups)
    codes = grid.quantize(groups, scale, zero).view(rows, cols)
    scales, zeros = scale.view(rows, n_groups), zero.view(rows, n_groups)
    g_idx = torch.arange(cols, device=dev) // width
    return build_result(
        codes, scales, zeros, g_idx, grid, target=w, hessian=h,
        damping=0.0, damping_retries=0, start=start,
    )  # fmt: skip
