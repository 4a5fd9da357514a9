"""Distributed calibration: 2 gloo ranks on shards equal one process on the union.

The ranks run in spawned processes (:mod:`distributed_worker`). Statistics are float sums, so
the distributed Grams differ from the single-process ones in summation order only: the codes
must be equal and the dequantized weights equal to float32 rounding (the scales are fit on
columns updated by GPTQ's error feedback, which carries those last-bit differences).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from calib_fixtures import Setup, make_calib
from distributed_worker import BATCHES, METHODS, run_rank, solved

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.distributed import GramReducer
from epmq.errors import EpmqError
from epmq.quant import QuantGrid


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(run_rank, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process_on_the_union(ranks: list[dict], method: str) -> None:
    first, second = ranks[0][method], ranks[1][method]
    single = solved(Setup(), make_calib(n_batches=BATCHES), method, None)
    assert first["world_size"] == 2
    assert first["tokens"] == second["tokens"] == single["tokens"]
    assert set(first["results"]) == set(single["results"])
    for name, want in single["results"].items():
        got, other = first["results"][name], second["results"][name]
        for key in ("weight", "codes", "scales", "zeros"):
            assert torch.equal(got[key], other[key]), f"{name}.{key}: ranks differ"
        assert torch.equal(got["codes"], want["codes"]), name
        torch.testing.assert_close(got["weight"], want["weight"], rtol=1e-5, atol=1e-6)
    for name, want in single["biases"].items():  # refit by bias correction (epmq+bias)
        assert torch.equal(first["biases"][name], second["biases"][name]), name
        torch.testing.assert_close(first["biases"][name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_solves_are_shared_out_among_ranks(ranks: list[dict], method: str) -> None:
    """Weight-parallel: each linear is solved by exactly one rank, and both ranks work."""
    mine = [ranks[r][method]["solves"] for r in range(2)]
    every = sorted(ranks[0][method]["results"])
    assert sorted(mine[0] + mine[1]) == every
    assert abs(len(mine[0]) - len(mine[1])) <= 1


def test_ranks_must_agree(ranks: list[dict]) -> None:
    for saved in ranks:
        assert "rank 1's seed differs from rank 0's" in saved["check_same"]


def test_no_process_group_means_no_reduction(setup: Setup) -> None:
    reducer = GramReducer()
    assert not reducer.active and reducer.world_size == 1
    with pytest.raises(EpmqError, match="process group"):
        GramReducer(True)
    with pytest.raises(EpmqError, match="process group"):
        quantize_model(
            setup.merged(),
            None,
            setup.calib,
            method="rtn",
            grid=QuantGrid(4),
            engine=EngineOptions(progress=False, distributed=True),
        )
