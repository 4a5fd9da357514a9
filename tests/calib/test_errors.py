"""User mistakes raise EpmqError naming the task, tensor or expert."""

from __future__ import annotations

import pytest
import torch
from calib_fixtures import Setup

from epmq.calib import EngineOptions, quantize_model
from epmq.errors import EpmqError
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid


def quantize(setup: Setup, model=None, calib=None, **kwargs):
    kwargs.setdefault("method", "epmq")
    kwargs.setdefault("grid", QuantGrid(4))
    kwargs.setdefault("experts", setup.experts)
    return quantize_model(
        model if model is not None else setup.merged(),
        BertAdapter(),
        calib if calib is not None else setup.calib,
        **{"engine": EngineOptions(progress=False), **kwargs},
    )


def test_task_without_calibration_data(setup: Setup) -> None:
    calib = dict(setup.calib)
    calib["beta"] = []
    with pytest.raises(EpmqError, match="'beta' has no calibration data"):
        quantize(setup, calib=calib)


def test_nan_in_merged_weights_fails_before_work(setup: Setup) -> None:
    model = setup.merged()
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    calls = []
    with pytest.raises(EpmqError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight"):
        quantize(
            setup,
            model=model,
            engine=EngineOptions(on_block_end=lambda s, i: calls.append(i), progress=False),
        )
    assert calls == []


def test_expert_missing_a_tensor(setup: Setup) -> None:
    broken = dict(setup.experts[1])
    del broken["encoder.layer.0.attention.self.key.weight"]
    experts = [setup.experts[0], broken, setup.experts[2]]
    with pytest.raises(EpmqError, match=r"'beta'.*attention\.self\.key\.weight"):
        quantize(setup, experts=experts)


def test_expert_with_other_shape(setup: Setup) -> None:
    broken = dict(setup.experts[2])
    broken["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 16)
    experts = [setup.experts[0], setup.experts[1], broken]
    with pytest.raises(EpmqError, match=r"'gamma'.*intermediate\.dense\.weight.*shape"):
        quantize(setup, experts=experts)


def test_wrong_number_of_experts(setup: Setup) -> None:
    with pytest.raises(EpmqError, match="2 experts given for 3 tasks"):
        quantize(setup, experts=setup.experts[:2])


def test_epmq_needs_experts(setup: Setup) -> None:
    with pytest.raises(EpmqError, match="expert"):
        quantize(setup, experts=None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "nonesuch"}, "unknown method"),
        ({"x_source": "teacher"}, "x_source"),
        ({"target": "base"}, "target"),
        ({"method": "gptq", "grid": None}, "needs a quantization grid"),
        ({"task_weights": [1.0, 2.0]}, "task_weights"),
        ({"task_weights": {"alpha": 1.0, "beta": 1.0}}, "'gamma'"),
    ],
)
def test_bad_options(setup: Setup, kwargs: dict, message: str) -> None:
    with pytest.raises(EpmqError, match=message):
        quantize(setup, **kwargs)


def test_batch_that_is_not_a_dict(setup: Setup) -> None:
    calib = dict(setup.calib)
    calib["alpha"] = [torch.zeros(2, 3)]
    with pytest.raises(EpmqError, match=r"'alpha'.*batch 0"):
        quantize(setup, calib=calib)
