"""The fp-target GPTQ solver (``gptq-fp``) on single layers: its target is the closed form,
and with no quantization upstream (``X^fp = X^q``) it is ``W_m``, so the solver is GPTQ there.

Tolerances: float64 statistics; the closed forms are compared to 1e-9 relative to max |W|,
the reduction to ``W_m`` to 1e-9 (float32 GPTQ on a target equal to 1e-9 gives equal codes).
"""

from __future__ import annotations

import pytest
import torch

import epmq.quant.solvers.gptq_fp as gptq_fp_module
from epmq.calib.solve import SolveOptions, solve_layer
from epmq.quant import QuantGrid, TargetSums
from epmq.quant.solvers import LayerProblem, get_solver

GRID = QuantGrid(3, group_size=8)
ROWS, COLS = 6, 16


def _problem(w_m: torch.Tensor, xs, xfps, weights) -> LayerProblem:
    sums = TargetSums(ROWS, COLS, dtype=torch.float64)
    for x, xf, w in zip(xs, xfps, weights, strict=True):
        n = x.shape[0]
        sums.add(x.T @ x / n, w_m, cross=xf.T @ x / n, task_weight=w)
    return LayerProblem("layer", w_m.clone(), None, None, None, sums=sums)


def _data(seed: int, drift: float):
    gen = torch.Generator().manual_seed(seed)
    w_m = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
    xs, xfps = [], []
    for i in range(3):
        x = torch.randn(40 + 5 * i, COLS, generator=gen, dtype=torch.float64) * (1 + i)
        xs.append(x)
        xfps.append(x + drift * torch.randn(x.shape, generator=gen, dtype=torch.float64))
    return w_m, xs, xfps


def _targets(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Record the target each GPTQ call of the solver rounds."""
    seen: list[torch.Tensor] = []
    real = gptq_fp_module.gptq

    def recording(target, hessian, grid, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(target.clone())
        return real(target, hessian, grid, **kwargs)

    monkeypatch.setattr(gptq_fp_module, "gptq", recording)
    return seen


@pytest.mark.parametrize("percdamp", [0.0, 0.01])
def test_target_is_the_closed_form(monkeypatch: pytest.MonkeyPatch, percdamp: float) -> None:
    """``W* = (W_m Σ w_i C_i + λ W_m)(Σ w_i H_i + λ I)⁻¹``, λ = percdamp · mean(diag S)."""
    w_m, xs, xfps = _data(0, drift=0.5)
    weights = [1.0, 0.5, 2.0]
    seen = _targets(monkeypatch)
    options = SolveOptions.of("gptq-fp", {"percdamp": percdamp}, GRID)
    solve_layer(_problem(w_m, xs, xfps, weights), options)
    s = sum(w * x.T @ x / x.shape[0] for x, w in zip(xs, weights, strict=True))
    c = sum(w * xf.T @ x / x.shape[0] for x, xf, w in zip(xs, xfps, weights, strict=True))
    lam = percdamp * float(s.diagonal().mean())
    want = torch.linalg.solve(s + lam * torch.eye(COLS, dtype=s.dtype), (w_m @ c + lam * w_m).T).T
    assert len(seen) == 1
    assert torch.allclose(seen[0].double(), want, atol=1e-9 * float(w_m.abs().max()), rtol=0)
    assert not torch.allclose(want, w_m, atol=1e-3)  # the drift moved the target


def test_without_drift_the_target_is_the_merge_and_the_result_gptq(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w_m, xs, _ = _data(1, drift=0.0)
    seen = _targets(monkeypatch)
    fp = solve_layer(_problem(w_m, xs, xs, [1.0] * 3), SolveOptions.of("gptq-fp", grid=GRID))
    assert torch.allclose(seen[0].double(), w_m, atol=1e-9 * float(w_m.abs().max()), rtol=0)
    plain = solve_layer(_problem(w_m, xs, xs, [1.0] * 3), SolveOptions.of("gptq", grid=GRID))
    assert fp.result is not None and plain.result is not None
    assert torch.equal(fp.result.codes, plain.result.codes)


def test_declarations() -> None:
    solver = get_solver("gptq-fp")
    assert solver.label == "GPTQ (fp targets)" and solver.target_stream == "merge"
    assert not solver.studied and not solver.reads_experts
    assert solver.second_stream("quantized") and solver.x_sources == ("quantized",)
