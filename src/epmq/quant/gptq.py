"""GPTQ: sequential rounding with error feedback (Frantar et al., IST-DASLab ``fasterquant``).

Minimise ``tr[(Q - W) H (Q - W)^T]`` over Q on the grid, one input column at a time. After
rounding column j, the remaining columns absorb its error so the layer output stays close:

    err_j   = (w_j - q_j) / U[j, j]              U: upper Cholesky factor of H^-1
    w_{k>j} -= err_j * U[j, k]                   (optimal update of the not-yet-rounded columns)

Updates are applied lazily: inside a block of ``block_size`` columns column by column, to the
columns after the block in one matmul ``W[:, i2:] -= Err @ U[i1:i2, i2:]``. The result is the
same as the column-by-column algorithm; the matmul just makes it fast.

Deviation from the reference, on purpose: with groups, a group's scale/zero is fitted when
the solver enters it, on the columns *fully* updated by all earlier errors (the block size is
aligned to the group size so this is always true; the reference reads partly stale columns).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from epmq.errors import EpmqError
from epmq.quant.checks import as_matrix, as_square, working_dtype
from epmq.quant.grid import QuantGrid
from epmq.quant.result import QuantResult, build_result

logger = logging.getLogger(__name__)

SYMMETRY_RTOL = 1e-3


def gptq(
    weight: Tensor,
    hessian: Tensor,
    grid: QuantGrid,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    max_damping_retries: int = 5,
) -> QuantResult:
    """Quantize ``weight`` [out, in] to ``grid`` minimising the proxy loss under ``hessian``.

    Args:
        weight: target weights, any float dtype (float64 input keeps the solve in float64).
        hessian: [in, in] symmetric PSD, e.g. ``X X^T / n`` of the layer inputs.
        grid: bits, group size, symmetric or not.
        block_size: columns per lazy-update block (speed only, not the result).
        percdamp: damping ``percdamp * mean(diag H)`` added to the diagonal of H.
        act_order: process columns by decreasing ``diag(H)``; ``g_idx`` records the groups.
        static_groups: fit all groups up front on the original weights.
        max_damping_retries: if Cholesky fails, damping is multiplied by 10 up to this often.

    Returns a :class:`QuantResult` whose ``proxy_loss`` is against ``weight`` and the
    undamped ``hessian``. Raises :class:`EpmqError` on NaN/Inf or bad shapes.
    """
    start = time.perf_counter()
    dtype = working_dtype(weight, hessian)
    w_target = as_matrix(weight, "weight", dtype)
    rows, cols = w_target.shape
    dev = w_target.device  # everything runs where the weight lives
    h_target = as_square(hessian, "hessian", cols, dtype, dev)
    _check_options(h_target, block_size, percdamp, max_damping_retries)
    n_groups = grid.n_groups(cols)
    gs = cols if grid.group_size == -1 else grid.group_size

    W, H = w_target.clone(), h_target.clone()
    # Dead inputs (never active): their weights are irrelevant; zero them, make H invertible.
    dead = (torch.diagonal(H) == 0).nonzero().flatten()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.empty(rows, n_groups, dtype=dtype, device=dev)
    zeros = torch.empty(rows, n_groups, dtype=dtype, device=dev)
    fixed = static_groups or grid.group_size == -1  # groups fitted once, on the original W
    if fixed:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid.fit(W[:, g * gs : (g + 1) * gs])

    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    U, damping, retries = _inverse_cholesky_upper(H, percdamp, max_damping_retries)
    del H

    codes = torch.empty_like(W)  # float-valued integer codes, in processing order
    bs = block_size if fixed else _aligned_block(block_size, gs)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty(rows, i2 - i1, dtype=dtype, device=dev)
        U1 = U[i1:i2, i1:i2]
        with _one_thread():  # tiny per-column ops: thread hand-offs cost more than they save
            _quantize_block(W, W1, Err1, U1, codes, scales, zeros, grid, i1, gs, fixed, perm)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)  # lazy update of later columns

    if fixed:
        g_idx = torch.arange(cols, device=dev) // gs
    else:
        g_idx = torch.empty(cols, dtype=torch.long, device=dev)
        order = perm if perm is not None else torch.arange(cols, device=dev)
        g_idx[order] = torch.arange(cols, device=dev) // gs  # column perm[j] is in group j // gs
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return build_result(
        codes, scales, zeros, g_idx, grid, target=w_target, hessian=h_target,
        damping=damping, damping_retries=retries, start=start,
    )  # fmt: skip


def _quantize_block(
    W: Tensor,
    W1: Tensor,
    Err1: Tensor,
    U1: Tensor,
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    grid: QuantGrid,
    i1: int,
    gs: int,
    fixed: bool,
    perm: Tensor | None,
) -> None:
    """Round the block's columns one by one, feeding each column's error to the rest."""
    for i in range(W1.shape[1]):
        j = i1 + i  # position in processing order
        if fixed:
            g = (int(perm[j]) if perm is not None else j) // gs
        else:
            g = j // gs
            if j % gs == 0:  # entering a new group: fit it on the error-updated columns
                cols_g = W1[:, i : i + gs] if i + gs <= W1.shape[1] else W[:, j : j + gs]
                scales[:, g], zeros[:, g] = grid.fit(cols_g)
        w = W1[:, i]
        c = grid.quantize(w, scales[:, g], zeros[:, g])
        q = grid.dequantize(c, scales[:, g], zeros[:, g])
        codes[:, j] = c
        err = (w - q) / U1[i, i]
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # w_k -= err * U[j, k], k >= j
        Err1[:, i] = err


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the enclosed small-tensor loop on one intra-op thread, then restore the setting."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_options(h: Tensor, block_size: int, percdamp: float, max_retries: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise EpmqError(f"gptq: block_size must be a positive int, got {block_size!r}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise EpmqError(f"gptq: percdamp must be a finite number >= 0, got {percdamp!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise EpmqError(f"gptq: max_damping_retries must be an int >= 0, got {max_retries!r}")
    if bool((torch.diagonal(h) < 0).any()):
        raise EpmqError("hessian has negative diagonal entries (not a Gram matrix)")
    scale = float(h.abs().max())
    if float((h - h.T).abs().max()) > SYMMETRY_RTOL * scale:
        raise EpmqError("hessian is not symmetric")


def _aligned_block(block_size: int, group_size: int) -> int:
    """A block size that never splits a group across a block boundary mid-way.

    Multiple of ``group_size`` if it fits, else the largest divisor of ``group_size``.
    """
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def _inverse_cholesky_upper(
    h: Tensor, percdamp: float, max_retries: int
) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor U of ``(H + damp I)^-1`` (``H^-1 = U^T U``), with damping retries.

    ``damp = percdamp * mean(diag H)``; on a non-positive-definite matrix ``percdamp`` is
    multiplied by 10 (0.01 if it was 0) up to ``max_retries`` times.
    """
    mean_diag = float(torch.diagonal(h).mean())
    damp = percdamp
    for attempt in range(max_retries + 1):
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            with _one_thread():  # LAPACK potri is ~10x slower multi-threaded on CPU
                h_inv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if attempt:
                    logger.warning(
                        "hessian not positive definite with percdamp=%g; succeeded with "
                        "percdamp=%g after %d retries",
                        percdamp,
                        damp,
                        attempt,
                    )
                return U, damp, attempt
        damp = damp * 10 if damp > 0 else 0.01
    raise EpmqError(
        f"hessian is not positive definite even with percdamp={damp / 10:g} "
        f"after {max_retries} retries"
    )
