"""QuantGrid, QuantResult and round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from epmq.errors import EpmqError
from epmq.quant import QuantGrid, proxy_loss, rtn


def test_grid_basics() -> None:
    assert QuantGrid(4).maxq == 15
    assert QuantGrid(2).maxq == 3
    assert QuantGrid(4).n_groups(96) == 1
    assert QuantGrid(4, group_size=32).n_groups(96) == 3
    assert QuantGrid(4).codes_dtype() == torch.uint8
    assert QuantGrid(12).codes_dtype() == torch.int32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": 4, "group_size": 0}, "group_size"),
        ({"bits": 4, "group_size": -2}, "group_size"),
    ],
)
def test_grid_rejects_bad_fields(kwargs: dict, field: str) -> None:
    with pytest.raises(EpmqError, match=field):
        QuantGrid(**kwargs)


def test_group_size_must_divide_in_features() -> None:
    with pytest.raises(EpmqError, match="group_size=32 does not divide in_features=100"):
        QuantGrid(4, group_size=32).n_groups(100)


def test_fit_range_includes_zero_and_handles_zero_rows() -> None:
    grid = QuantGrid(3)
    w = torch.tensor([[1.0, 2.0, 3.0], [-3.0, -1.0, -2.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]])
    scale, zero = grid.fit(w)
    assert torch.all(scale > 0)
    assert torch.equal(zero, torch.round(zero))
    q = grid.dequantize(grid.quantize(w, scale, zero), scale, zero)
    assert torch.equal(q[2], torch.zeros(3))  # all-zero row stays exactly zero
    # the grid spans [min(w, 0), max(w, 0)] up to half a step: no clipping beyond scale/2
    assert torch.all((q - w).abs() <= scale[:, None] / 2 + 1e-6)
    assert torch.all(scale <= torch.tensor([3.0, 3.0, 2.0, 3.0]) / grid.maxq + 1e-7)


def test_symmetric_zero_point() -> None:
    grid = QuantGrid(4, symmetric=True)
    scale, zero = grid.fit(torch.tensor([[-2.0, 1.0], [0.5, 3.0]]))
    assert torch.equal(zero, torch.full((2,), 8.0))
    assert torch.allclose(scale, torch.tensor([4.0, 6.0]) / 15)  # centred on 0 in every row


@pytest.mark.parametrize("grid", [QuantGrid(2), QuantGrid(3, 16), QuantGrid(4, 32, True)])
def test_rtn_is_nearest_grid_point(grid: QuantGrid) -> None:
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    res = rtn(w, grid)
    assert res.codes.dtype == torch.uint8
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= grid.maxq
    assert torch.equal(res.weight, res.dequantize())
    assert torch.equal(
        res.g_idx,
        (
            torch.arange(64)
            // (64 if grid.group_size == -1 else 16 if grid.group_size == 16 else 32)
        ).to(torch.int32),
    )
    # brute force: distance to every point of the row/group grid
    levels = torch.arange(grid.maxq + 1, dtype=torch.float32)
    idx = res.g_idx.long()
    points = res.scales[:, idx, None] * (levels - res.zeros[:, idx, None])  # [out, in, levels]
    nearest = (points - w[:, :, None]).abs().min(dim=2).values
    assert torch.allclose((res.weight - w).abs(), nearest, atol=1e-6)
    assert res.proxy_loss != res.proxy_loss  # nan without a hessian


def test_rtn_reports_proxy_loss_and_accepts_half_precision() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    h = torch.eye(32)
    res = rtn(w, QuantGrid(4), h)
    assert res.weight.dtype == torch.float32
    assert res.proxy_loss == pytest.approx(float(((res.weight - w.float()) ** 2).sum()), rel=1e-5)
    assert res.proxy_loss == pytest.approx(proxy_loss(res.weight, w.float(), h), rel=1e-6)


def test_high_bit_codes_are_int32() -> None:
    w = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    res = rtn(w, QuantGrid(12))
    assert res.codes.dtype == torch.int32
    assert int(res.codes.max()) <= 4095
    assert torch.equal(res.weight, res.dequantize())
    assert float((res.weight - w).abs().max()) < 1e-2


@pytest.mark.parametrize(
    ("bad", "message"),
    [(float("nan"), "weight contains NaN"), (float("inf"), "weight contains Inf")],
)
def test_rtn_rejects_non_finite_weight(bad: float, message: str) -> None:
    w = torch.ones(4, 8)
    w[1, 3] = bad
    with pytest.raises(EpmqError, match=message):
        rtn(w, QuantGrid(4))


def test_rtn_rejects_bad_shapes() -> None:
    with pytest.raises(EpmqError, match="weight must be 2-D"):
        rtn(torch.ones(8), QuantGrid(4))
    with pytest.raises(EpmqError, match="hessian must have shape"):
        rtn(torch.ones(4, 8), QuantGrid(4), torch.eye(4))
