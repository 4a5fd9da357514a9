"""``epmq run`` / ``epmq demo`` under ``torchrun``: one experiment, its calibration shared out.

Every rank runs the same experiment (the same merges, the same variants, in the same order),
with its own share of every task's calibration batches (:func:`epmq.calib.distributed.shard`):
the calibration engine all-reduces the statistics and shares the solves out among the ranks
(:mod:`epmq.calib.distributed`), so every rank holds the same solved model. Rank 0 alone owns
the output: it checks the folder, keeps the journal, exports and evaluates every model and
writes the report; the other ranks evaluate nothing and write nothing.

Order of work. Rank 0 prepares the workload first (a built-in suite may train its experts
into the cache), then the others load it. Rank 0 then sends the models its journal already
holds (a resumed run), so that every rank skips exactly the same models: a rank building a
model the others skip would wait for them forever.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from epmq.calib.distributed import shard
from epmq.eval.results import Row, SweepPoint
from epmq.experiment.journal import Journal
from epmq.experiment.workload import Workload


class RankJournal(Journal):
    """What a rank other than 0 knows of rank 0's journal: the finished models, in memory
    (it writes nothing), so the runner skips the models rank 0 skips."""

    def __init__(self, rows: Mapping[str, Row], points: Mapping[str, SweepPoint]) -> None:
        self.path = Path(os.devnull)
        self.fingerprint = {}
        self.rows = dict(rows)
        self.points = dict(points)
        self.exports = []

    def _append(self, entry: dict[str, Any], mode: str = "a") -> None:
        """Nothing is written: rank 0 keeps the run's journal."""


def share_journal(journal: Journal | None, rank: int) -> Journal:
    """Rank 0's finished models sent to every rank: rank 0 gets its own ``journal`` back,
    every other rank a :class:`RankJournal` of the same rows and sweep points."""
    sent: list[Any] = [None]
    if rank == 0:
        assert journal is not None
        rows = {k: r.model_dump(mode="json") for k, r in journal.rows.items()}
        points = {k: p.model_dump(mode="json") for k, p in journal.points.items()}
        sent = [(rows, points)]
    dist.broadcast_object_list(sent, src=0)
    if rank == 0:
        assert journal is not None
        return journal
    rows, points = sent[0]
    return RankJournal(
        {k: Row.model_validate(r) for k, r in rows.items()},
        {k: SweepPoint.model_validate(p) for k, p in points.items()},
    )


def rank_workload(workload: Workload, rank: int, world: int) -> Workload:
    """``workload`` as rank ``rank`` of ``world`` runs it: its share of every task's
    calibration batches, and (ranks other than 0) no evaluation: rank 0 scores every model."""
    changes: dict[str, Any] = {"calibration": shard(workload.calibration, rank, world)}
    if rank != 0:
        changes["evaluate"] = _not_evaluated
    settings = {**workload.settings, "ranks": world}
    return dataclasses.replace(workload, settings=settings, **changes)


def _not_evaluated(
    model: nn.Module, heads: Mapping[str, Any], tasks: Sequence[str]
) -> dict[str, float]:
    """A rank other than 0's stand-in for evaluation (its figures are never reported)."""
    return {task: 0.0 for task in tasks}


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world > 1:
        dist.barrier()
