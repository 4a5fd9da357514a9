"""GPTQ: grid membership, agreement with the plain algorithm, groups/act-order, optimality."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from epmq.errors import EpmqError
from epmq.quant import QuantGrid, gptq, proxy_loss, rtn

CONFIGS = [
    (QuantGrid(4), False, False),
    (QuantGrid(3, 8), False, False),
    (QuantGrid(3, 8), True, False),
    (QuantGrid(3, 8), True, True),
    (QuantGrid(2, 16, symmetric=True), False, True),
    (QuantGrid(4, 32), True, False),
]


def plain_gptq(
    w: Tensor, h: Tensor, grid: QuantGrid, act_order: bool, static_groups: bool, percdamp: float
) -> Tensor:
    """The textbook column-by-column algorithm (no blocks), returning integer codes."""
    w, h = w.clone(), h.clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = cols if grid.group_size == -1 else grid.group_size
    fixed = static_groups or grid.group_size == -1
    params = [grid.fit(w[:, g : g + gs]) for g in range(0, cols, gs)] if fixed else []
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.empty_like(w)
    for j in range(cols):
        if fixed:
            scale, zero = params[int(perm[j]) // gs]
        elif j % gs == 0:
            scale, zero = grid.fit(w[:, j : j + gs])
        codes[:, j] = grid.quantize(w[:, j], scale, zero)
        err = (w[:, j] - grid.dequantize(codes[:, j], scale, zero)) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])
    return codes[:, torch.argsort(perm)]


@pytest.mark.parametrize(("grid", "act_order", "static_groups"), CONFIGS)
@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_matches_plain_algorithm_and_lies_on_grid(
    make_layer: Callable, grid: QuantGrid, act_order: bool, static_groups: bool, block_size: int
) -> None:
    w, _, h = make_layer(6, 64, seed=3)
    res = gptq(w, h, grid, block_size=block_size, act_order=act_order, static_groups=static_groups)
    expected = plain_gptq(w, h, grid, act_order, static_groups, 0.01)
    assert torch.equal(res.codes.to(torch.float64), expected)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= grid.maxq
    assert torch.equal(res.weight, res.dequantize())
    assert res.scales.shape == res.zeros.shape == (6, grid.n_groups(64))
    assert torch.equal(res.zeros, torch.round(res.zeros))
    assert res.proxy_loss == pytest.approx(proxy_loss(res.weight, w, h), rel=1e-12)
    assert res.damping == 0.01 and res.damping_retries == 0


def test_g_idx_with_act_order_follows_hessian_diagonal(make_layer: Callable) -> None:
    w, _, h = make_layer(5, 32, seed=4)
    res = gptq(w, h, QuantGrid(3, 8), act_order=True)
    order = torch.argsort(torch.diagonal(h), descending=True)
    for k in range(4):
        assert torch.all(res.g_idx[order[8 * k : 8 * k + 8]] == k)
    assert torch.bincount(res.g_idx.long()).tolist() == [8, 8, 8, 8]
    assert res.g_idx.dtype == torch.int32
    # a column's codes decode with its own group's scale/zero
    j = int(order[0])
    assert torch.equal(res.weight[:, j], res.scales[:, 0] * (res.codes[:, j] - res.zeros[:, 0]))


def test_static_groups_use_original_groups_and_rtn_grid(make_layer: Callable) -> None:
    w, _, h = make_layer(5, 32, seed=5)
    grid = QuantGrid(3, 8)
    res = gptq(w, h, grid, act_order=True, static_groups=True)
    assert torch.equal(res.g_idx, (torch.arange(32) // 8).to(torch.int32))
    ref = rtn(w, grid)
    assert torch.equal(res.scales, ref.scales) and torch.equal(res.zeros, ref.zeros)


def test_float32_and_half_inputs(make_layer: Callable) -> None:
    w, _, h = make_layer(8, 32, seed=6, dtype=torch.float32)
    for weight in (w, w.half(), w.bfloat16()):
        res = gptq(weight, h, QuantGrid(4))
        assert res.weight.dtype == res.scales.dtype == torch.float32
        assert torch.equal(res.weight, res.dequantize())


def optimum(w: Tensor, h: Tensor, grid: QuantGrid, scale: Tensor, zero: Tensor) -> float:
    """Exact minimum of the proxy loss on a fixed per-row grid, by enumeration (rows separate)."""
    cols = w.shape[1]
    levels = range(grid.maxq + 1)
    codes = torch.tensor(list(itertools.product(levels, repeat=cols)), dtype=w.dtype)
    d = scale[:, None, None] * (codes - zero[:, None, None]) - w[:, None, :]  # [out, combos, in]
    return float(torch.einsum("rci,ij,rcj->rc", d, h, d).min(dim=1).values.sum())


@pytest.mark.parametrize("cols", [3, 4])
def test_gptq_against_rtn_and_enumerated_optimum(make_layer: Callable, cols: int) -> None:
    """What holds on 2-bit layers with a fixed min-max grid (measured over 100 seeds):

    GPTQ beats RTN on 78-90% of seeds with a 10-25% lower mean loss, and its median loss is
    1.15-1.45x the exact optimum (RTN: 1.4-2.0x). It is *not* always better than RTN: when
    error feedback pushes weights past the clipped grid range it can lose by up to ~8x.
    """
    grid = QuantGrid(2)
    losses = []
    for seed in range(100):
        w, _, h = make_layer(8, cols, seed=seed, tokens=64)
        r, g = rtn(w, grid, h), gptq(w, h, grid, percdamp=0.0)
        assert g.damping_retries == 0
        assert torch.equal(g.scales, r.scales)  # same fixed grid for all three
        best = optimum(w, h, grid, r.scales[:, 0], r.zeros[:, 0])
        losses.append((r.proxy_loss, g.proxy_loss, best))
    t = torch.tensor(losses, dtype=torch.float64)
    loss_rtn, loss_gptq, best = t.unbind(1)
    assert torch.all(best <= torch.minimum(loss_rtn, loss_gptq) * (1 + 1e-9))
    assert (loss_gptq <= loss_rtn * (1 + 1e-9)).double().mean() >= 0.7
    assert loss_gptq.mean() <= 0.92 * loss_rtn.mean()
    assert (loss_gptq / best).median() <= 1.6
    assert (loss_rtn / best).median() > (loss_gptq / best).median()


def test_dead_columns_are_zeroed(make_layer: Callable) -> None:
    w, x, _ = make_layer(6, 16, seed=7)
    x[[2, 9]] = 0.0
    h = x @ x.T / x.shape[1]
    res = gptq(w, h, QuantGrid(4), act_order=True)
    assert torch.all(res.weight[:, [2, 9]] == 0)
    assert res.damping_retries == 0
    assert res.proxy_loss == pytest.approx(proxy_loss(res.weight, w, h), rel=1e-12)


def test_all_dead_hessian_gives_zero_weight() -> None:
    res = gptq(torch.randn(4, 8), torch.zeros(8, 8), QuantGrid(4))
    assert torch.equal(res.weight, torch.zeros(4, 8))
    assert res.proxy_loss == 0.0


def test_rank_deficient_hessian_recovers_with_recorded_damping(
    make_layer: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    w, _, h = make_layer(6, 32, seed=8, tokens=8)  # rank 8 < 32
    with caplog.at_level(logging.WARNING, logger="epmq.quant.gptq"):
        res = gptq(w, h, QuantGrid(4), percdamp=0.0)
    assert res.damping_retries >= 1 and res.damping > 0
    assert "not positive definite" in caplog.text
    assert torch.isfinite(res.weight).all()
    assert res.proxy_loss == pytest.approx(proxy_loss(res.weight, w, h), rel=1e-12)


def test_indefinite_hessian_recovers_or_fails_clearly() -> None:
    h = torch.tensor([[1.0, 2.5], [2.5, 1.0]], dtype=torch.float64)  # eigenvalues 3.5, -1.5
    w = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    res = gptq(w, h, QuantGrid(4))
    assert res.damping_retries == 3 and res.damping == pytest.approx(10.0)
    with pytest.raises(EpmqError, match="hessian is not positive definite"):
        gptq(w, h, QuantGrid(4), max_damping_retries=2)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("weight", float("nan"), "weight contains NaN"),
        ("weight", float("-inf"), "weight contains Inf"),
        ("hessian", float("nan"), "hessian contains NaN"),
        ("hessian", float("inf"), "hessian contains Inf"),
    ],
)
def test_non_finite_inputs_raise(where: str, value: float, message: str) -> None:
    w, h = torch.randn(4, 8), torch.eye(8)
    (w if where == "weight" else h)[1, 1] = value
    with pytest.raises(EpmqError, match=message):
        gptq(w, h, QuantGrid(4))


def test_bad_hessians_and_options_raise() -> None:
    w = torch.randn(4, 8)
    with pytest.raises(EpmqError, match=r"hessian must have shape \(8, 8\)"):
        gptq(w, torch.eye(7), QuantGrid(4))
    with pytest.raises(EpmqError, match="negative diagonal"):
        gptq(w, -torch.eye(8), QuantGrid(4))
    asym = torch.eye(8)
    asym[0, 1] = 0.5
    with pytest.raises(EpmqError, match="not symmetric"):
        gptq(w, asym, QuantGrid(4))
    with pytest.raises(EpmqError, match="block_size"):
        gptq(w, torch.eye(8), QuantGrid(4), block_size=0)
    with pytest.raises(EpmqError, match="percdamp"):
        gptq(w, torch.eye(8), QuantGrid(4), percdamp=-1.0)
    with pytest.raises(EpmqError, match="does not divide"):
        gptq(w, torch.eye(8), QuantGrid(4, 3))


def test_parameters_that_require_grad_are_not_tracked(make_layer: Callable) -> None:
    w, _, h = make_layer(4, 16, seed=11, dtype=torch.float32)
    param = torch.nn.Parameter(w.clone())
    res = gptq(param, h, QuantGrid(4))
    assert not res.weight.requires_grad and res.weight.grad_fn is None
    assert torch.equal(res.codes, gptq(w, h, QuantGrid(4)).codes)
    assert torch.equal(param, w)  # the input is never modified
