"""Folding each task's statistics while calibrating changes no bit and keeps one task at a time.

The engine folds every finished task into ``S = Σ w_i H_i`` (and ``B = Σ w_i W_i H_i`` for
E-PMQ) instead of keeping K Grams per linear (calib/statistics.py). ``keep_grams=True`` keeps
the per-task Grams and folds them at the solve, which is the reference here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_family_resume_and_grid import FamilySetup, families  # noqa: F401 (fixture)

from epmq.calib import EngineOptions
from epmq.calib.statistics import FoldedStatistics
from epmq.quant import QuantGrid

SETTINGS = [
    ("gptq", "quantized", "expert"),
    ("epmq", "quantized", "expert"),
    ("epmq", "expert", "expert"),
    ("epmq", "quantized", "merged"),
]


def _quantize(setup: FamilySetup, method: str, x_source: str, target: str, keep: bool) -> Any:
    engine = EngineOptions(keep_grams=keep, progress=False)
    return setup.quantize(
        method,
        x_source,
        grid=QuantGrid(3, group_size=16),
        engine=engine,
        task_weights=[1.0, 0.5],
        target=target,
    )


@pytest.mark.parametrize("family", ["bert", "t5"])
@pytest.mark.parametrize(("method", "x_source", "target"), SETTINGS)
def test_folding_while_calibrating_is_exact(
    families: Callable[[str], FamilySetup],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    family: str,
    method: str,
    x_source: str,
    target: str,
) -> None:
    setup = families(family)
    assert len(setup.calib) == 2
    held: list[int] = []  # per-task accumulators alive per linear at each fold
    original = FoldedStatistics.end_task

    def spying(self: FoldedStatistics, task: str) -> None:
        held.extend(len(accs) for accs in self.acc.values())
        original(self, task)
        assert all(not accs for accs in self.acc.values())

    monkeypatch.setattr(FoldedStatistics, "end_task", spying)
    model, run = _quantize(setup, method, x_source, target, keep=False)
    assert held and set(held) == {1}, "folding never ran, or kept more than one task"
    count = len(held)
    reference, ref_run = _quantize(setup, method, x_source, target, keep=True)
    assert len(held) == count, "keep_grams=True must keep the per-task Grams, not fold"
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name
    for name, result in run.results.items():
        assert torch.equal(result.codes, ref_run.results[name].codes), name
    assert [r.proxy_loss for r in run.layers] == [r.proxy_loss for r in ref_run.layers]
    assert [r.tokens for r in run.layers] == [r.tokens for r in ref_run.layers]
