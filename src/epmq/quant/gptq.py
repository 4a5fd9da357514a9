"""GPTQ: sequential rounding with error feedback (Frantar et al., IST-DASLab ``fasterquant``).

Minimise ``tr[(Q - W) H (Q - W)^T]`` over Q on the grid, one input column at a time. After
rounding column j, the remaining columns absorb its error so the layer output stays close:

    err_j   = (w_j - q_j) / U[j, j]              U: upper Cholesky factor of H^-1
    w_{k>j} -= err_j * U[j, k]                   (optimal update of the not-yet-rounded columns)

The updates are applied lazily, at two levels, with the same result as column by column:
inside a sub-block of ``SUB_BLOCK`` columns one rank-1 update per column, to the rest of the
block in one matmul per sub-block, to the columns after the block (``block_size``) in one
matmul per block: ``W[:, i2:] -= Err @ U[i1:i2, i2:]``.

Layout: the solver works on ``W^T`` [in, out], so column j of W is the contiguous row
``Wt[j]``; every per-column operation reads and writes contiguous memory, in place.

U comes from one Cholesky factorisation (of H reversed) and a triangular inverse done in
matmuls (:func:`_inverse_cholesky_upper`); the proxy loss from the errors the loop produced,
``||Err||^2 - damp ||Q - W||^2``, without another [out, in] x [in, in] product
(:func:`_loss_from_errors`).

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
    H = h_target.clone()
    dead = torch.diagonal(H) == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W = w_target.masked_fill(dead, 0.0)

    fixed = static_groups or grid.group_size == -1  # groups fitted once, on the original W
    if fixed:  # all groups at once: row r of group g is row r * n_groups + g of the reshape
        scales, zeros = (t.view(rows, n_groups) for t in grid.fit(W.reshape(-1, gs)))
    else:
        scales = torch.empty(rows, n_groups, dtype=dtype, device=dev)
        zeros = torch.empty(rows, n_groups, dtype=dtype, device=dev)

    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    U, damping, retries = _inverse_cholesky_upper(H, percdamp, max_damping_retries)
    lam = damping * torch.diagonal(H).mean()  # the damping added to H's diagonal
    del H

    # Group of the column processed j-th: j // gs, unless fixed groups are visited permuted.
    col_group = perm // gs if fixed and perm is not None else None
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()  # [n_groups, out]
    Wt = W.T.contiguous()  # [in, out]; W is not used again
    del W
    codes_t, err_sq = _quantize_columns(
        Wt, U, grid, scales_t, zeros_t, gs, fit_groups=not fixed, col_group=col_group,
        block_size=block_size if fixed else _aligned_block(block_size, gs),
        sub_block=SUB_BLOCK if fixed else _aligned_block(min(SUB_BLOCK, block_size), gs),
    )  # fmt: skip
    del U

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
    loss = None  # exact, by one matmul, where damping had to be raised (see _loss_from_errors)
    if retries == 0:
        loss = _loss_from_errors(err_sq, lam, q, w_target, dead)
    return build_result(
        codes_t.T.contiguous(), scales_t.T.contiguous(), zeros_t.T.contiguous(), g_idx, grid,
        target=w_target, hessian=h_target, damping=damping, damping_retries=retries,
        start=start, weight=q, loss=loss,
    )  # fmt: skip


def _loss_from_errors(err_sq: Tensor, lam: Tensor, q: Tensor, w: Tensor, dead: Tensor) -> float:
    """``tr[(Q - W) H (Q - W)^T]`` from the errors the loop saw, without an [in, in] matmul.

    With D = Q - W (dead columns left out: H is zero there and the solver keeps q = 0) and
    the damped ``H_d = H + lam I``: W - Q = Err U and ``H_d^-1 = U^T U``, so
    ``tr(D H_d D^T) = ||Err||^2`` and ``tr(D H D^T) = ||Err||^2 - lam ||D||^2``. The two
    terms are close only when the damping dominates H, which is why a raised damping falls
    back to the matmul.
    """
    d = (q - w).masked_fill_(dead, 0.0)
    return float(err_sq - lam.double() * _sum_sq(d))


def _sum_sq(t: Tensor) -> Tensor:
    """Sum of squares of a 2-D tensor, accumulated over its rows in float64."""
    return torch.linalg.vector_norm(t, dim=1).double().square().sum()


def _quantize_columns(
    Wt: Tensor,
    U: Tensor,
    grid: QuantGrid,
    scales_t: Tensor,
    zeros_t: Tensor,
    gs: int,
    *,
    fit_groups: bool,
    col_group: Tensor | None,
    block_size: int,
    sub_block: int,
) -> tuple[Tensor, Tensor]:
    """The column loop on ``Wt`` [in, out]; returns the codes (transposed) and ``||Err||^2``.

    On return ``Wt[j]`` holds the dequantized column q_j. With ``fit_groups`` the group
    starting at column j is fitted into ``scales_t[j // gs]`` when the loop reaches it;
    otherwise column j uses group ``col_group[j]`` (or ``j // gs``). Never reads a tensor
    value on the host.
    """
    cols, rows = Wt.shape
    codes_t = torch.empty_like(Wt)
    err_sq = torch.zeros((), dtype=torch.float64, device=Wt.device)
    # Inside a block, once column j is rounded its row Wt[j] holds err_j (what the updates
    # read) and q_j waits in Q[j - i1] until the block is done.
    Q = torch.empty(block_size, rows, dtype=Wt.dtype, device=Wt.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if col_group is not None:  # this block's columns' scales, gathered on the device
            S1, Z1 = (t.index_select(0, col_group[i1:i2]) for t in (scales_t, zeros_t))
        with _one_thread(Wt.device):  # tiny per-column ops: thread hand-offs cost more
            for s1 in range(i1, i2, sub_block):
                s2 = min(s1 + sub_block, i2)
                for j in range(s1, s2):
                    if fit_groups and j % gs == 0:  # entering a group: every earlier error is in
                        scales_t[j // gs], zeros_t[j // gs] = grid.fit(Wt[j : j + gs].T)
                    if col_group is None:
                        s, z = scales_t[j // gs], zeros_t[j // gs]
                    else:
                        s, z = S1[j - i1], Z1[j - i1]
                    w = Wt[j]
                    c = grid.quantize(w, s, z, out=codes_t[j])
                    q = grid.dequantize(c, s, z, out=Q[j - i1])
                    err = w.sub_(q).div_(U[j, j])  # err_j = (w_j - q_j) / U[j, j], in place
                    Wt[j + 1 : s2].addr_(U[j, j + 1 : s2], err, alpha=-1.0)  # w_k -= U[j,k] err_j
                # the rest of the block absorbs the sub-block's errors: W -= Err U, transposed
                Wt[s2:i2].addmm_(U[s1:s2, s2:i2].T, Wt[s1:s2], alpha=-1.0)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Wt[i1:i2], alpha=-1.0)  # the later blocks
        err_sq += _sum_sq(Wt[i1:i2])
        Wt[i1:i2] = Q[: i2 - i1]
    return codes_t, err_sq


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
    if bool(_max_abs(h - h.T) > SYMMETRY_RTOL * _max_abs(h)):
        raise EpmqError("hessian is not symmetric")


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


def _inverse_cholesky_upper(
    h: Tensor, percdamp: float, max_retries: int
) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor U of ``(H + damp I)^-1`` (``H^-1 = U^T U``), with damping retries.

    ``damp = percdamp * mean(diag H)``; on a non-positive-definite matrix ``percdamp`` is
    multiplied by 10 (0.01 if it was 0) up to ``max_retries`` times.

    With J the reversal permutation and ``J H J = L L^T`` (Cholesky of H reversed),
    ``H^-1 = J L^-T L^-1 J = U^T U`` with ``U = J L^-1 J`` upper triangular (positive
    diagonal): one Cholesky and one triangular inverse, instead of the reference's Cholesky,
    inverse from it, and a second Cholesky.
    """
    mean_diag = float(torch.diagonal(h).mean())
    damp = percdamp
    for attempt in range(max_retries + 1):
        hd = h.flip(0, 1)
        hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            U = _lower_inverse(L).flip(0, 1)
            if bool(torch.isfinite(U).all()):
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


def _lower_inverse(L: Tensor, leaf: int = 256) -> Tensor:
    """Inverse of a lower-triangular matrix, by halves so that the work is in matmuls.

    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``.
    """
    out = torch.zeros_like(L)

    def fill(a: int, b: int) -> None:  # out[a:b, a:b] = L[a:b, a:b]^-1
        if b - a <= leaf:
            eye = torch.eye(b - a, dtype=L.dtype, device=L.device)
            out[a:b, a:b] = torch.linalg.solve_triangular(L[a:b, a:b], eye, upper=False)
            return
        k = (a + b) // 2
        fill(a, k)
        fill(k, b)
        out[k:b, a:k] = -(out[k:b, k:b] @ (L[k:b, a:k] @ out[a:k, a:k]))

    fill(0, L.shape[0])
    return out
