"""The AWQ solver on single layers: the β search, its guarantee over RTN, grid exactness."""

from __future__ import annotations

import pytest
import torch

from epmq.quant import QuantGrid, TargetSums, rtn
from epmq.quant.loss import proxy_loss
from epmq.quant.solvers import LayerProblem, get_solver, list_solvers
from epmq.quant.solvers.awq import awq_quantize, channel_scale, search_scale

GRID = QuantGrid(4, 32)
DEFAULTS = get_solver("awq").resolve({})


def _problem(rows: int, cols: int, seed: int, spread: float = 3.0) -> LayerProblem:
    """A layer whose input channels have magnitudes spread over ``e^±spread``."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    magnitude = torch.exp(spread * (torch.rand(cols, generator=gen) - 0.5))
    x = torch.randn(cols, 256, generator=gen) * magnitude[:, None]
    sums = TargetSums(0, cols)
    sums.add(x @ x.T / 256)
    return LayerProblem("layer", weight, None, None, None, sums=sums)


def _loss(problem: LayerProblem, s: torch.Tensor) -> float:
    """Brute force, independent of the solver: ``tr[(RTN(W s)/s − W) S (…)ᵀ]``."""
    assert problem.sums is not None
    q = rtn(problem.merged * s, GRID).weight
    return proxy_loss(q / s, problem.merged, problem.sums.s)


def test_awq_is_registered() -> None:
    assert "awq" in list_solvers(rounding=True)
    solver = get_solver("awq")
    assert solver.input_scales is not None and solver.statistics == "hessian"


def test_search_picks_the_grid_minimum() -> None:
    problems = [_problem(24, 64, seed) for seed in (1, 2)]
    problems[1].sums = problems[0].sums  # two linears reading one input
    assert problems[0].sums is not None
    rms = problems[0].sums.s.diagonal().sqrt()
    losses = [sum(_loss(p, torch.ones(64)) for p in problems)]
    losses += [
        sum(_loss(p, channel_scale(rms, i / 20, None)) for p in problems) for i in range(1, 20)
    ]
    best = min(range(20), key=lambda i: losses[i])
    assert best > 0 and losses[best] < 0.9 * losses[0]  # uneven activations: scaling helps
    s = search_scale(problems, GRID, DEFAULTS)
    assert s is not None
    torch.testing.assert_close(s, channel_scale(rms, best / 20, None), rtol=0, atol=0)


def test_flat_activations_keep_plain_rtn() -> None:
    problem = _problem(8, 64, 3, spread=0.0)
    assert problem.sums is not None
    problem.sums.s = torch.eye(64)  # every channel alike: s = 1 for every β
    assert search_scale([problem], GRID, DEFAULTS) is None
    plain = rtn(problem.merged, GRID, hessian=problem.sums.s)
    got = awq_quantize(problem.merged, problem.sums.s, GRID, None, DEFAULTS)
    assert torch.equal(got.codes, plain.codes) and got.proxy_loss == plain.proxy_loss


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_on_grid_and_never_worse_than_rtn(clip: bool, symmetric: bool) -> None:
    grid = QuantGrid(3, 16, symmetric)
    params = {**DEFAULTS, "clip": clip}
    for seed in range(3):
        problem = _problem(16, 64, seed)
        assert problem.sums is not None
        s = search_scale([problem], grid, params)
        result = awq_quantize(problem.merged, problem.sums.s, grid, s, params)
        assert torch.equal(result.weight, result.dequantize())  # bit for bit
        assert int(result.codes.max()) <= grid.maxq
        plain = rtn(problem.merged, grid, hessian=problem.sums.s).proxy_loss
        assert result.proxy_loss <= plain * (1 + 1e-6)
        if not clip:  # the reported loss is the searched one
            assert s is not None
            q = rtn(problem.merged * s, grid).weight
            assert result.proxy_loss == pytest.approx(
                proxy_loss(q / s, problem.merged, problem.sums.s), rel=1e-6
            )


def test_clipping_lowers_each_groups_own_error() -> None:
    problem = _problem(32, 128, 5)
    assert problem.sums is not None
    h = problem.sums.s
    plain = awq_quantize(problem.merged, h, GRID, None, DEFAULTS)
    clipped = awq_quantize(problem.merged, h, GRID, None, {**DEFAULTS, "clip": True})
    assert not torch.equal(plain.codes, clipped.codes)

    def block_error(q: torch.Tensor) -> float:  # Σ_g d_g H_gg d_gᵀ, what clipping minimises
        d = (q - problem.merged).view(32, 4, 32)
        blocks = torch.stack([h[g * 32 : (g + 1) * 32, g * 32 : (g + 1) * 32] for g in range(4)])
        return float(torch.einsum("rgi,gij,rgj->", d, blocks, d))

    assert block_error(clipped.weight) < block_error(plain.weight)
