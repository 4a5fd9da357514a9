"""Linears fed the same tensor (q/k/v) share one recorded input and one Gram accumulator."""

from __future__ import annotations

import torch
from calib_fixtures import make_base

from epmq.calib.statistics import LinearInputs, TaskStatistics
from epmq.quant import GramAccumulator

QKV = ["attention.self.query", "attention.self.key", "attention.self.value"]
NAMES = [*QKV, "attention.output.dense", "intermediate.dense", "output.dense"]


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(2, 7, 32, generator=gen) for _ in range(3)]


@torch.no_grad()
def test_qkv_share_one_input_and_grams_equal_separate_accumulation() -> None:
    block = make_base().encoder.layer[0]
    stats = TaskStatistics(block, NAMES, ["t"], cross=False)
    separate = {n: GramAccumulator(block.get_submodule(n).in_features) for n in NAMES}
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    recorder = LinearInputs(block, NAMES, stop=False)
    for hidden in _batches():
        with recorder:
            recorder.reset(mask)
            block(hidden)
        inputs = recorder.inputs
        assert inputs[QKV[0]] is inputs[QKV[1]] is inputs[QKV[2]]
        assert inputs["attention.output.dense"] is not inputs[QKV[0]]
        assert inputs[QKV[0]].shape == (int(mask.sum()), 32)  # padding dropped
        stats.add("t", inputs, None)
        for name in NAMES:
            separate[name].add(inputs[name].clone())  # a fresh tensor: never shared
    for name in NAMES:
        torch.testing.assert_close(stats.grams(name)[0], separate[name].gram)
        assert stats.counts(name) == {"t": separate[name].count}
    # One accumulator for q/k/v (taken, kept and all-reduced once), separate from o's.
    accs = [stats.acc[n]["t"] for n in QKV]
    assert len({id(a) for a in accs}) == 1
    assert stats.acc["attention.output.dense"]["t"] is not accs[0]
    assert len(stats.distinct_accumulators()) == len(NAMES) - 2
    # replacing them keeps the sharing
    stats.replace_accumulators(lambda acc: GramAccumulator.from_state_dict(acc.state_dict()))
    assert len({id(stats.acc[n]["t"]) for n in QKV}) == 1
    torch.testing.assert_close(stats.grams(QKV[2])[0], separate[QKV[2]].gram)


@torch.no_grad()
def test_same_tensor_under_different_masks_is_not_shared() -> None:
    block = make_base().encoder.layer[0]
    recorder = LinearInputs(block, QKV, stop=False)
    mask = torch.ones(2, 7, dtype=torch.bool)
    other = mask.clone()
    other[0, 3:] = False
    with recorder:
        recorder.reset(mask, {QKV[2]: other})
        block(torch.randn(2, 7, 32))
    inputs = recorder.inputs
    assert inputs[QKV[0]] is inputs[QKV[1]]
    assert inputs[QKV[2]] is not inputs[QKV[0]]
    assert inputs[QKV[2]].shape[0] == int(other.sum())
