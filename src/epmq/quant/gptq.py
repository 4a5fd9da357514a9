"""GPTQ: sequential rounding with error feedback (Frantar et al., IST-DASLab ``fasterquant``).

Minimise ``tr[(Q - W) H (Q - W)^T]`` over Q on the grid, one input column at a time. After
rounding column j, the remaining columns absorb its error so the layer output stays close:

    err_j   = (w_j - q_j) / U[j, j]              U: upper Cholesky factor of H^-1
    w_{k>j} -= err_j * U[j, k]                   (optimal update of the not-yet-rounded columns)

U is never formed. With ``H = V V^T`` (V upper: the Cholesky factor of H with rows and
columns reversed, :func:`_reverse_cholesky`), ``U = V^-1``, and the updates, summed up, give
``W - Q = Err U``, i.e. ``Err = D V`` with ``D = W - Q`` (W the input weights). For a block b
of columns with diagonal block ``C = V[b, b]`` (so ``U[b, b] = C^-1``) and the columns < b
done, ``U[<b, b] = -U[<b, <b] V[<b, b] C^-1`` and ``Err_<b U[<b, <b] = D_<b``, so the block's
columns updated by every earlier error are (left-looking, one matmul per block)

    W_b - Err_<b U[<b, b] = W_b + D_<b V[<b, b] C^-1

and inside the block the updates above run with ``U[b, b] = C^-1``: one rank-1 update per
column inside a sub-block of ``SUB_BLOCK`` columns, to the rest of the block in one matmul per
sub-block. Work: the Cholesky (n^3/6) and the updates (out n^2/2); no n^3/3 inverse.

Layout: the solver works on ``W^T`` [in, out], so column j of W is the contiguous row
``Wt[j]``; every per-column operation reads and writes contiguous memory, in place.

The proxy loss comes from the errors the loop produced, ``||Err||^2 - damp ||Q - W||^2``,
without another [out, in] x [in, in] product.

Devices: everything lives on the weight's device, and the column loop never reads a tensor
value on the host (no ``.item()``, no branch on values), so a CUDA weight is solved without
host synchronisation; only input checks and the damping retries look at values, once a layer.

Deviation from the reference, on purpose: with groups, a group's scale/zero is fitted when
the solver enters it, on the columns *fully* updated by all earlier errors (block and
sub-block sizes are aligned to the group size so this is always true; the reference reads
partly stale columns).
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
SUB_BLOCK = 32  # columns per rank-1-update sub-block (speed only, not the result)


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
        weight: target weights, any float dtype (float64 input keeps the solve in float64),
            on any device; the solve and the result stay on that device.
        hessian: [in, in] symmetric PSD, e.g. ``X X^T / n`` of the layer inputs (moved to the
            weight's device if it is elsewhere).
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

    # Dead inputs (never active): their weights are irrelevant; zero them, make H invertible.
    dead = torch.diagonal(h_target) == 0
    h_diag = torch.diagonal(h_target).masked_fill(dead, 1.0)  # H's diagonal, dead set to 1
    perm = torch.argsort(h_diag, descending=True) if act_order else None

    fixed = static_groups or grid.group_size == -1  # groups fitted once, on the original W
    if fixed:  # all groups at once: row r of group g is row r * n_groups + g of the reshape
        w_live = w_target.masked_fill(dead, 0.0).reshape(-1, gs)
        scales, zeros = (t.view(rows, n_groups) for t in grid.fit(w_live))
        del w_live
    else:
        scales = torch.empty(rows, n_groups, dtype=dtype, device=dev)
        zeros = torch.empty(rows, n_groups, dtype=dtype, device=dev)

    # W^T [in, out] and H in the order the columns are processed (dead inputs: W^T's rows
    # zeroed in place, H's diagonal read from h_diag by the factorisation).
    if perm is None:
        Wt, h_order, diag_order = w_target.T.contiguous(), h_target, h_diag
        Wt.masked_fill_(dead.unsqueeze(1), 0.0)
    else:
        Wt = w_target.T.index_select(0, perm)
        h_order = h_target.index_select(0, perm).index_select(1, perm)
        Wt.masked_fill_(dead[perm].unsqueeze(1), 0.0)
        diag_order = h_diag[perm]
    V, damping, retries = _reverse_cholesky(h_order, diag_order, percdamp, max_damping_retries)
    del h_order

    # Group of the column processed j-th: j // gs, unless fixed groups are visited permuted.
    col_group = perm // gs if fixed and perm is not None else None
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()  # [n_groups, out]
    if not fixed:  # a fitted group lies in one block and starts a sub-block or lies in one
        block_size = max(block_size // gs, 1) * gs
    codes_t, err_sq, d_sq = _quantize_columns(
        Wt, V, grid, scales_t, zeros_t, gs, fit_groups=not fixed, col_group=col_group,
        block_size=block_size,
        sub_block=SUB_BLOCK if fixed else _aligned_block(min(SUB_BLOCK, block_size), gs),
    )  # fmt: skip
    del V

    if fixed:
        g_idx = torch.arange(cols, device=dev) // gs
    else:
        g_idx = torch.empty(cols, dtype=torch.long, device=dev)
        order = perm if perm is not None else torch.arange(cols, device=dev)
        g_idx[order] = torch.arange(cols, device=dev) // gs  # column perm[j] is in group j // gs
    if perm is not None:
        inverse = torch.argsort(perm)
        codes_t, Wt = codes_t[inverse], Wt[inverse]
    q = Wt.T.contiguous()  # the loop left q_j in Wt[j]
    # The loss from the errors the loop saw, without an [in, in] matmul: with D = W - Q (dead
    # columns are 0 in both) and the damped H_d = H + lam I, W - Q = Err U and
    # H_d^-1 = U^T U give tr(D H_d D^T) = ||Err||^2, so tr(D H D^T) = ||Err||^2 - lam ||D||^2.
    # The two terms are close only when the damping dominates H, which is why a raised
    # damping falls back to the matmul (build_result).
    loss = None
    if retries == 0:
        loss = float(err_sq - damping * h_diag.double().mean() * d_sq)
    return build_result(
        codes_t.T.contiguous(), scales_t.T.contiguous(), zeros_t.T.contiguous(), g_idx, grid,
        target=w_target, hessian=h_target, damping=damping, damping_retries=retries,
        start=start, weight=q, loss=loss,
    )  # fmt: skip


def _sum_sq(t: Tensor) -> Tensor:
    """Sum of squares of a 2-D tensor, accumulated over its rows in float64."""
    return torch.linalg.vector_norm(t, dim=1).double().square().sum()


def _quantize_columns(
    Wt: Tensor,
    V: Tensor,
    grid: QuantGrid,
    scales_t: Tensor,
    zeros_t: Tensor,
    gs: int,
    *,
    fit_groups: bool,
    col_group: Tensor | None,
    block_size: int,
    sub_block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The column loop on ``Wt`` [in, out], ``H_d = V V^T``: codes^T, ``||Err||^2``, ``||D||^2``.

    On return ``Wt[j]`` holds the dequantized column q_j. With ``fit_groups`` the group
    starting at column j is fitted into ``scales_t[j // gs]`` when the loop reaches it (the
    group lies in one block); otherwise column j uses group ``col_group[j]`` (or ``j // gs``).
    Never reads a tensor value on the host.
    """
    cols, rows = Wt.shape
    codes_t = torch.empty_like(Wt)  # row j: c_j - z (integers), the zero point added at the end
    Dt = torch.empty_like(Wt)  # row j: d_j = w_j - q_j once its block is done (W the input)
    err_sq = torch.zeros((), dtype=torch.float64, device=Wt.device)  # ||Err||^2
    d_sq = torch.zeros_like(err_sq)  # ||W - Q||^2
    B = torch.empty(block_size, rows, dtype=Wt.dtype, device=Wt.device)  # the block's columns
    Q, E = torch.empty_like(B), torch.empty_like(B)  # the block's q_j and w_j - q_j
    # Codes through the integer offset t = c - z: clamp(round(w/s) + z, 0, maxq) - z equals
    # clamp(round(w/s), -z, maxq - z) exactly (integers in floats), and q = s t.
    lows_t, highs_t = -zeros_t, grid.maxq - zeros_t
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        n = i2 - i1
        eye = torch.eye(n, dtype=V.dtype, device=V.device)
        Ub = torch.linalg.solve_triangular(V[i1:i2, i1:i2], eye, upper=True)  # U[b, b] = C^-1
        Bb = B[:n]
        if i1:  # left-looking: w_b + D_<b V_<b,b C^-1, in one matmul with the block's rows
            torch.addmm(Wt[i1:i2], (V[:i1, i1:i2] @ Ub).T, Dt[:i1], out=Bb)
        else:
            Bb.copy_(Wt[:i2])
        # R[j, k] = U[j, k] / U[j, j] for k > j (0 elsewhere): w_k -= R[j, k] (w_j - q_j)
        R = (Ub / Ub.diagonal().unsqueeze(1)).triu_(1)
        if col_group is not None:  # this block's columns' grids, gathered on the device
            cg = col_group[i1:i2]
            per_col = [t.index_select(0, cg).unbind(0) for t in (scales_t, lows_t, highs_t)]
        with _one_thread(Wt.device):  # tiny per-column ops: thread hand-offs cost more
            for s1 in range(0, n, sub_block):
                s2 = min(s1 + sub_block, n)
                Bs = Bb[s1:s2]
                views = (Bs, R[s1:s2, s1:s2], codes_t[i1 + s1 : i1 + s2], Q[s1:s2], E[s1:s2])
                columns = zip(*(v.unbind(0) for v in views), strict=True)
                for j, (w, r, t, q, e) in enumerate(columns, i1 + s1):
                    if col_group is not None:
                        s, lo, hi = (p[j - i1] for p in per_col)
                    elif j % gs == 0:  # entering a group (with fit_groups: all errors are in)
                        g = j // gs
                        if fit_groups:
                            scales_t[g], zeros_t[g] = grid.fit(Bb[j - i1 : j - i1 + gs].T)
                            lows_t[g], highs_t[g] = -zeros_t[g], grid.maxq - zeros_t[g]
                        s, lo, hi = scales_t[g], lows_t[g], highs_t[g]
                    torch.div(w, s, out=t).round_().clamp_(lo, hi)  # t = c_j - z
                    torch.mul(t, s, out=q)  # q_j = s (c_j - z)
                    torch.sub(w, q, out=e)  # w_j - q_j = err_j U[j, j]
                    Bs.addr_(r, e, alpha=-1.0)  # the sub-block's later columns absorb it
                # the rest of the block absorbs the sub-block's errors: W -= Err U, transposed
                Bb[s2:].addmm_(R[s1:s2, s2:].T, E[s1:s2], alpha=-1.0)
        err_sq += _sum_sq(E[:n].mul_(V.diagonal()[i1:i2].unsqueeze(1)))  # err_j: 1/U[j,j] = V[j,j]
        d_sq += _sum_sq(torch.sub(Wt[i1:i2], Q[:n], out=Dt[i1:i2]))
        Wt[i1:i2] = Q[:n]
    if col_group is None:  # c = t + z, group by group
        codes_t.view(-1, gs, rows).add_(zeros_t.unsqueeze(1))
    else:
        codes_t.add_(zeros_t.index_select(0, col_group))
    return codes_t, err_sq, d_sq


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """On CPU, run the enclosed small-tensor loop on one intra-op thread, then restore."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
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
    if bool(_max_asymmetry(h) > SYMMETRY_RTOL * _max_abs(h)):
        raise EpmqError("hessian is not symmetric")


def _max_asymmetry(h: Tensor, tile: int = 256) -> Tensor:
    """``max |H - H^T|``, tile pair by tile pair: a whole ``h - h.T`` reads H^T with a stride
    of n (at n = 4096, 0.24 s on one thread against 0.03 s by tiles that stay in cache)."""
    n = h.shape[0]
    worst = h.new_zeros(())
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            worst = torch.maximum(
                worst, _max_abs(h[i : i + tile, j : j + tile] - h[j : j + tile, i : i + tile].T)
            )
    return worst


def _max_abs(t: Tensor) -> Tensor:
    """``max |t|`` in one pass, without the copy that ``t.abs()`` makes."""
    lo, hi = torch.aminmax(t)
    return torch.maximum(-lo, hi)


def _aligned_block(block_size: int, group_size: int) -> int:
    """A block size that never splits a group across a block boundary mid-way.

    Multiple of ``group_size`` if it fits, else the largest divisor of ``group_size``.
    """
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def _reverse_cholesky(
    h: Tensor, diag: Tensor, percdamp: float, max_retries: int, block: int = 256
) -> tuple[Tensor, float, int]:
    """Upper-triangular V with ``H_d = V V^T``, H_d = H with ``diag + damp`` on its diagonal.

    ``damp = percdamp * mean(diag)``; on a non-positive-definite matrix ``percdamp`` is
    multiplied by 10 (0.01 if it was 0) up to ``max_retries`` times. ``H_d^-1 = U^T U`` with
    ``U = V^-1``: the reference's upper Cholesky factor of H_d^-1, which the solver never forms
    beyond one diagonal block at a time.

    Block columns from the last to the first (left-looking; the Cholesky factorisation of H
    with rows and columns reversed): with the columns after block b done,
    ``A = H_d[:b+, b] - V[:b+, >b] V[b, >b]^T`` (rows up to the block's end), the diagonal
    block ``C C^T = A[b]`` (C upper: a small Cholesky, reversed) and ``V[<b, b] = A[<b] C^-T``.
    n^3/6 multiply-adds in matmuls; no copy of H, no reversal of the whole matrix.
    """
    n = h.shape[0]
    mean = float(diag.mean())
    damp = percdamp
    for attempt in range(max_retries + 1):
        V = torch.zeros_like(h)
        failed = torch.zeros((), dtype=torch.bool, device=h.device)  # read once, at the end
        for i2 in range(n, 0, -block):
            i1 = max(i2 - block, 0)
            A = h[:i2, i1:i2].clone()
            A[i1:i2].diagonal().copy_(diag[i1:i2]).add_(damp * mean)
            if i2 < n:
                A.addmm_(V[:i2, i2:], V[i1:i2, i2:].T, alpha=-1.0)
            L, info = torch.linalg.cholesky_ex(A[i1:i2].flip(0, 1))
            failed |= info != 0  # a pivot <= 0 (or NaN): not positive definite
            C = L.flip(0, 1)
            V[i1:i2, i1:i2] = C
            if i1:
                V[:i1, i1:i2] = torch.linalg.solve_triangular(C.T, A[:i1], upper=False, left=False)
        if not bool(failed):
            if attempt:
                logger.warning(
                    "hessian not positive definite with percdamp=%g; succeeded with "
                    "percdamp=%g after %d retries",
                    percdamp,
                    damp,
                    attempt,
                )
            return V, damp, attempt
        damp = damp * 10 if damp > 0 else 0.01
    raise EpmqError(
        f"hessian is not positive definite even with percdamp={damp / 10:g} "
        f"after {max_retries} retries"
    )
