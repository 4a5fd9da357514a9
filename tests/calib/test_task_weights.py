"""``task_weights: auto`` (calib/task_weights.py): distances, weights and fixed-point rounds."""

from __future__ import annotations

import copy

import pytest
import torch
from calib_fixtures import TASKS, average, make_base, make_calib, make_experts
from transformers import BertModel

from epmq.calib.task_weights import (
    ExpertOutputs,
    TaskWeighting,
    auto_task_weights,
    distances,
    initial_weights,
    reweighted,
)
from epmq.models import adapter_for


def _model(base: BertModel, state: dict[str, torch.Tensor]) -> BertModel:
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model.eval()


class FarSetup:
    """Expert alpha = the base, beta far from it, gamma near; the merge is their average."""

    def __init__(self) -> None:
        self.base = make_base()
        near = make_experts(self.base, k=1, scale=0.05)[0]
        far = make_experts(self.base, k=1, scale=0.6)[0]
        self.states = {"alpha": self.base.state_dict(), "beta": far, "gamma": near}
        self.merged = _model(self.base, average(list(self.states.values())))
        self.calib = make_calib()
        self.loaded: list[str] = []

    def load_expert(self, task: str) -> BertModel:
        self.loaded.append(task)
        return _model(self.base, self.states[task])


@pytest.fixture(scope="module")
def far() -> FarSetup:
    return FarSetup()


@torch.no_grad()
def _relative_error(model: BertModel, expert: BertModel, batches: list[dict]) -> float:
    """Σ‖f − f_i‖² / Σ‖f_i‖² over real tokens of ``last_hidden_state`` (a BERT's backbone
    output is its last layer's), computed directly."""
    error = norm = 0.0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        got = model(**batch).last_hidden_state[mask]
        want = expert(**batch).last_hidden_state[mask]
        error += float(((got - want) ** 2).sum())
        norm += float((want**2).sum())
    return error / norm


def test_distances_are_the_relative_output_errors(far: FarSetup) -> None:
    adapter = adapter_for(far.merged)
    outputs = ExpertOutputs.collect(far.load_expert, adapter, far.calib)
    assert far.loaded == list(TASKS)  # each expert loaded once
    found = distances(far.merged, adapter, far.calib, outputs)
    for task in TASKS:
        want = _relative_error(far.merged, far.load_expert(task), far.calib[task])
        assert found[task] == pytest.approx(want, rel=1e-5)
    expert_itself = distances(far.load_expert("beta"), adapter, far.calib, outputs)
    assert expert_itself["beta"] == pytest.approx(0.0, abs=1e-10)


def test_auto_weights_favour_the_expert_farthest_from_the_merge(far: FarSetup) -> None:
    weighting = TaskWeighting(far.calib, far.load_expert, rounds=0)
    chosen = weighting.choose("auto", "average", far.merged, quantize=_never)
    weights = chosen.weights
    assert chosen.setting == "auto" and list(weights) == list(TASKS)
    assert sum(weights.values()) == pytest.approx(len(TASKS))
    assert weights["beta"] > 1.0 > weights["alpha"]
    assert weights["beta"] == max(weights.values())
    assert chosen.values == [weights[t] for t in TASKS]
    found = chosen.rounds[0]  # w_i = K d_i / Σ d_j
    assert weights["beta"] == pytest.approx(3 * found["beta"] / sum(found.values()))


def _never(weights: list[float]) -> BertModel:
    raise AssertionError("round 0 only: nothing is quantized")


def test_the_weighting_math() -> None:
    assert initial_weights({"a": 2.0, "b": 1.0, "c": 1.0}) == {"a": 1.5, "b": 0.75, "c": 0.75}
    assert initial_weights({"a": 0.0, "b": 0.0}) == {"a": 1.0, "b": 1.0}  # the experts: uniform
    # w_i ← w_i · d_i / mean d, renormalised to mean 1
    updated = reweighted({"a": 1.5, "b": 0.5}, {"a": 1.0, "b": 3.0})
    raw = {"a": 1.5 * 1.0 / 2.0, "b": 0.5 * 3.0 / 2.0}
    total = sum(raw.values())
    assert updated == pytest.approx({t: 2 * w / total for t, w in raw.items()})
    assert sum(updated.values()) == pytest.approx(2.0)
    assert reweighted({"a": 1.2, "b": 0.8}, {"a": 0.0, "b": 0.0}) == {"a": 1.2, "b": 0.8}


def test_rounds_quantize_with_the_current_weights(far: FarSetup) -> None:
    adapter = adapter_for(far.merged)
    outputs = ExpertOutputs.collect(far.load_expert, adapter, far.calib)
    near = _model(far.base, far.states["gamma"])
    asked: list[list[float]] = []

    def quantize(weights: list[float]) -> BertModel:
        asked.append(weights)
        return near  # a stand-in "quantized" model: the near expert

    result = auto_task_weights(far.merged, adapter, far.calib, outputs, rounds=2, quantize=quantize)
    start = initial_weights(distances(far.merged, adapter, far.calib, outputs))
    assert asked[0] == pytest.approx([start[t] for t in TASKS])
    second = distances(near, adapter, far.calib, outputs)
    once = reweighted(start, second)
    assert asked[1] == pytest.approx([once[t] for t in TASKS])
    assert result.weights == pytest.approx(reweighted(once, second))
    assert len(result.rounds) == 3 and result.rounds[1] == pytest.approx(second)
    assert result.rounds[1]["gamma"] == pytest.approx(0.0, abs=1e-10)
    assert result.weights["gamma"] < start["gamma"]  # gamma's expert is now met exactly


def test_uniform_and_given_settings_need_no_expert(far: FarSetup) -> None:
    weighting = TaskWeighting(far.calib, _no_expert)
    uniform = weighting.choose("uniform", "average", far.merged, _never)
    assert uniform.values is None and uniform.weights == {t: 1.0 for t in TASKS}
    given = weighting.choose({"beta": 2.5}, "average", far.merged, _never)
    assert given.setting == "given" and given.values == [1.0, 2.5, 1.0]


def _no_expert(task: str) -> BertModel:
    raise AssertionError("no expert is read for fixed weights")
