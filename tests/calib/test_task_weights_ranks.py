"""``task_weights: auto`` under torchrun: ranks on shards of the calibration batches measure
the distances of the union (so every rank chooses the same weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from test_task_weights import FarSetup

from epmq.calib.distributed import shard
from epmq.calib.task_weights import ExpertOutputs, distances
from epmq.models import adapter_for


def _distances_on_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One gloo rank: the merge's distances on this rank's shard of the batches."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        far = FarSetup()
        calib = shard(far.calib, rank, world)
        adapter = adapter_for(far.merged)
        outputs = ExpertOutputs.collect(far.load_expert, adapter, calib)
        found = distances(far.merged, adapter, calib, outputs)
        Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_ranks_on_shards_measure_the_distances_of_the_union(tmp_path: Path) -> None:
    """Under torchrun each rank holds a shard: the sums are all-reduced, so every rank gets
    the single process's distances (and so the same weights: the engine checks it)."""
    mp.spawn(
        _distances_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    far = FarSetup()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    adapter = adapter_for(far.merged)
    outputs = ExpertOutputs.collect(far.load_expert, adapter, far.calib)
    single = distances(far.merged, adapter, far.calib, outputs)
    assert ranks[0] == ranks[1]
    assert ranks[0] == pytest.approx(single, rel=1e-9)
