"""Work shared across runs gives identical results: RTN without data, cached merged statistics."""

from __future__ import annotations

import pytest
import torch
from calib_fixtures import Setup

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.stats_cache import StatsCache
from epmq.errors import EpmqError
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid


def run(setup: Setup, calib, **kwargs):
    model = setup.merged()
    kwargs.setdefault("engine", EngineOptions(progress=False))
    return model, quantize_model(model, BertAdapter(), calib, **kwargs)


def assert_same_run(a, b) -> None:
    """Same weights, codes, scales, zeros and group indices for every linear."""
    (model_a, run_a), (model_b, run_b) = a, b
    state_b = model_b.state_dict()
    for name, value in model_a.state_dict().items():
        assert torch.equal(value, state_b[name]), name
    assert run_a.results.keys() == run_b.results.keys()
    for name, result in run_a.results.items():
        other = run_b.results[name]
        for field in ("weight", "codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(result, field), getattr(other, field)), (name, field)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_rtn_without_data_rounds_like_rtn_with_data(setup: Setup, group_size: int) -> None:
    grid = QuantGrid(3, group_size=group_size)
    with_data = run(setup, setup.calib, method="rtn", grid=grid)
    data_free = run(setup, None, method="rtn", grid=grid)
    assert_same_run(with_data, data_free)
    records = data_free[1].layers
    assert [r.name for r in records] == [r.name for r in with_data[1].layers]
    assert all(r.tokens == {} and r.proxy_loss != r.proxy_loss for r in records)  # NaN loss


def test_only_rtn_runs_without_data(setup: Setup) -> None:
    with pytest.raises(EpmqError, match="needs calibration data"):
        run(setup, None, method="gptq", grid=QuantGrid(4))


VARIANTS = [
    {"method": "gptq", "grid": QuantGrid(4)},
    {"method": "epmq", "grid": QuantGrid(3), "alpha": 0.1},
    {"method": "epmq", "grid": QuantGrid(3), "alpha": 1.0, "target": "merged"},
    {"method": "epmq", "grid": None, "alpha": 0.1},
    {"method": "rtn", "grid": QuantGrid(4)},
]


@pytest.mark.parametrize("memory_limit", [2**40, 0])  # in memory / spilled to disk
def test_cached_merged_statistics_give_identical_variants(
    setup: Setup, memory_limit: int, tmp_path
) -> None:
    folder = None if memory_limit else tmp_path / "stats"
    with StatsCache(folder, memory_limit=memory_limit) as cache:
        for number, variant in enumerate(VARIANTS):
            kwargs = {**variant, "experts": setup.experts, "x_source": "merged"}
            fresh = run(setup, setup.calib, **kwargs)
            cached = run(
                setup,
                setup.calib,
                **kwargs,
                engine=EngineOptions(progress=False, stats_cache=cache),
            )
            assert cache.complete
            assert cache.hits == 2 * number  # the first cached run filled it, the rest read it
            assert_same_run(fresh, cached)
            assert [r.tokens for r in fresh[1].layers] == [r.tokens for r in cached[1].layers]
        if folder is not None:
            assert len(list(folder.glob("*.safetensors"))) == 2


def test_cache_refuses_other_data_and_x_sources(setup: Setup) -> None:
    cache = StatsCache()
    run(
        setup,
        setup.calib,
        method="gptq",
        grid=QuantGrid(4),
        x_source="merged",
        engine=EngineOptions(progress=False, stats_cache=cache),
    )
    fewer = {task: batches[:1] for task, batches in setup.calib.items()}
    with pytest.raises(EpmqError, match="other data"):
        run(
            setup,
            fewer,
            method="gptq",
            grid=QuantGrid(4),
            x_source="merged",
            engine=EngineOptions(progress=False, stats_cache=cache),
        )
    with pytest.raises(EpmqError, match="x_source='merged'"):
        run(
            setup,
            setup.calib,
            method="gptq",
            grid=QuantGrid(4),
            engine=EngineOptions(progress=False, stats_cache=cache),
        )
