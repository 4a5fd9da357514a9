"""GPTQ on any device: no host reads in the column loop, results where the inputs live."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from epmq.quant import QuantGrid, gptq, proxy_loss
from epmq.quant.gptq import _quantize_columns, _reverse_cholesky

META = torch.device("meta")


@pytest.mark.parametrize(("fit_groups", "permuted"), [(True, False), (False, False), (False, True)])
def test_column_loop_never_reads_values_on_the_host(fit_groups: bool, permuted: bool) -> None:
    """Meta tensors have no values: any .item(), bool() or int() of one raises, and so does
    mixing them with a tensor created on the CPU by mistake."""
    cols, rows, gs = 64, 8, 16
    Wt = torch.empty(cols, rows, device=META)
    V = torch.empty(cols, cols, device=META)
    scales_t = torch.empty(cols // gs, rows, device=META)
    zeros_t = torch.empty(cols // gs, rows, device=META)
    col_group = torch.empty(cols, dtype=torch.long, device=META) if permuted else None
    codes_t, err_sq, d_sq = _quantize_columns(
        Wt, V, QuantGrid(4, gs), scales_t, zeros_t, gs, fit_groups=fit_groups,
        col_group=col_group, block_size=32, sub_block=8,
    )  # fmt: skip
    assert codes_t.device == err_sq.device == META
    assert codes_t.shape == (cols, rows) and err_sq.dtype == d_sq.dtype == torch.float64


def test_reverse_cholesky_factor_is_upper_and_inverts_to_the_reference_u(
    make_layer: Callable,
) -> None:
    """``H_d = V V^T`` with V upper, and ``V^-1`` is the reference's upper Cholesky factor U
    of ``H_d^-1`` (what the solver's in-block updates use, block by block)."""
    _, _, h = make_layer(4, 37, seed=0)
    hd = h + 0.01 * torch.diagonal(h).mean() * torch.eye(37, dtype=h.dtype)
    V, damping, retries = _reverse_cholesky(h, torch.diagonal(h), 0.01, 0, block=8)  # 5 blocks
    assert (damping, retries) == (0.01, 0)
    assert torch.equal(V, V.triu())
    assert torch.allclose(V @ V.T, hd, rtol=0, atol=1e-12)
    reference_u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    assert torch.allclose(torch.linalg.inv(V), reference_u, rtol=0, atol=1e-10)


@pytest.mark.parametrize("act_order", [False, True])
def test_float32_loss_from_errors_matches_the_matmul(make_layer: Callable, act_order: bool) -> None:
    w, _, h = make_layer(48, 256, seed=12, dtype=torch.float32)
    h[:, 7] = h[7, :] = 0.0  # a dead input
    res = gptq(w, h, QuantGrid(3, 32), act_order=act_order)
    exact = proxy_loss(res.weight.double(), w.double(), h.double())
    assert res.proxy_loss == pytest.approx(exact, rel=1e-5)
    assert torch.all(res.weight[:, 7] == 0)


def test_results_are_contiguous_on_the_input_device(make_layer: Callable) -> None:
    w, _, h = make_layer(12, 64, seed=13, dtype=torch.float32)
    res = gptq(w, h, QuantGrid(4, 16), act_order=True)
    for t in (res.weight, res.codes, res.scales, res.zeros, res.g_idx):
        assert t.device == w.device and t.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("grid", "act_order", "static_groups"),
    [(QuantGrid(4, 32), False, False), (QuantGrid(3, 32), True, False),
     (QuantGrid(4, 32, symmetric=True), True, True), (QuantGrid(2), False, False)],
)  # fmt: skip
def test_cuda_matches_cpu_without_host_sync(
    make_layer: Callable,
    monkeypatch: pytest.MonkeyPatch,
    grid: QuantGrid,
    act_order: bool,
    static_groups: bool,
) -> None:
    module = importlib.import_module("epmq.quant.gptq")
    loop = module._quantize_columns

    def loop_that_must_not_sync(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.set_sync_debug_mode("error")  # a host read of a CUDA value raises
        try:
            return loop(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(module, "_quantize_columns", loop_that_must_not_sync)
    kw = {"act_order": act_order, "static_groups": static_groups}
    w, _, h = make_layer(64, 256, seed=14)  # float64: the same codes on both devices
    cpu, gpu = gptq(w, h, grid, **kw), gptq(w.cuda(), h.cuda(), grid, **kw)
    for t in (gpu.weight, gpu.codes, gpu.scales, gpu.zeros, gpu.g_idx):
        assert t.is_cuda
    assert torch.equal(gpu.codes.cpu(), cpu.codes)
    assert torch.allclose(gpu.weight.cpu(), cpu.weight, rtol=0, atol=1e-12)
    assert gpu.proxy_loss == pytest.approx(cpu.proxy_loss, rel=1e-9)
    w32, h32 = w.float(), h.float()
    gpu32, cpu32 = gptq(w32.cuda(), h32.cuda(), grid, **kw), gptq(w32, h32, grid, **kw)
    assert gpu32.proxy_loss == pytest.approx(cpu32.proxy_loss, rel=1e-3)
    # float32 rounding differs between devices; a code flipped near a rounding tie changes the
    # errors fed to the rest of its row (rows are independent), so allow a few rows to diverge
    assert (gpu32.codes.cpu() == cpu32.codes).double().mean() > 0.95
