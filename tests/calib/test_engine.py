"""quantize_model on a tiny BERT: accuracy, grid, E-PMQ vs GPTQ, X-sources, targets."""

from __future__ import annotations

import json

import pytest
import torch
from calib_fixtures import Setup, outputs, task_error

from epmq.calib import EngineOptions, quantize_model
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid
from solver_params import params_for

LINEARS_PER_BLOCK = 6


def run(setup: Setup, **kwargs):
    model = setup.merged()
    kwargs.setdefault("engine", EngineOptions(progress=False))
    result = quantize_model(model, BertAdapter(), setup.calib, **kwargs)
    return model, result


def max_output_gap(a, b, setup: Setup) -> float:
    gaps = []
    for batches in setup.calib.values():
        for x, y in zip(outputs(a, batches), outputs(b, batches), strict=True):
            gaps.append(float((x - y).abs().max()))
    return max(gaps)


@pytest.mark.parametrize("method", ["rtn", "gptq", "epmq"])
def test_8bit_stays_close_to_merged(setup: Setup, method: str) -> None:
    model, result = run(
        setup, method=method, grid=QuantGrid(8), experts=setup.experts,
        **params_for(method, alpha=1.0),
    )  # fmt: skip
    gap = max_output_gap(model, setup.merged(), setup)
    assert gap < 0.1
    assert len(result.layers) == 2 * LINEARS_PER_BLOCK
    assert set(result.results) == {r.name for r in result.layers}


def test_weights_lie_on_grid_and_match_results(setup: Setup) -> None:
    grid = QuantGrid(3, group_size=16)
    model, result = run(setup, method="gptq", grid=grid)
    params = dict(model.named_parameters())
    for name, res in result.results.items():
        weight = params[f"{name}.weight"].detach()
        torch.testing.assert_close(weight, res.weight.float(), rtol=0, atol=0)
        codes = res.codes.long()
        assert codes.min() >= 0 and codes.max() <= grid.maxq
        torch.testing.assert_close(res.dequantize().float(), weight, rtol=0, atol=0)
        distinct = {round(v, 5) for v in (weight[0, :16] / res.scales[0, 0]).tolist()}
        assert len(distinct) <= grid.maxq + 1
        # one copy in memory: the result's weight is the model's own float32 storage
        assert res.weight.data_ptr() == params[f"{name}.weight"].data_ptr()


def test_half_precision_model_keeps_no_float32_copy_of_the_weights(setup: Setup) -> None:
    """A bfloat16 model holds the rounded weights in bfloat16; the results keep codes and
    scales only (a float32 copy of every linear would hold twice the model) and give the
    float32 weight back on request."""
    model = setup.merged().to(torch.bfloat16)
    run_ = quantize_model(
        model,
        BertAdapter(),
        setup.calib,
        method="rtn",
        grid=QuantGrid(8),
        engine=EngineOptions(progress=False),
    )
    params = dict(model.named_parameters())
    for name, res in run_.results.items():
        assert res.weight is None
        assert res.dequantized().dtype == torch.float32
        torch.testing.assert_close(res.dequantized().bfloat16(), params[f"{name}.weight"].detach())


def test_epmq_beats_gptq_on_expert_outputs(setup: Setup) -> None:
    grid = QuantGrid(4)
    gptq_model, _ = run(setup, method="gptq", grid=grid)
    epmq_model, _ = run(setup, method="epmq", grid=grid, experts=setup.experts, alpha=0.05)
    gptq_err = task_error(gptq_model, setup)
    epmq_err = task_error(epmq_model, setup)
    assert epmq_err < 0.9 * gptq_err


def test_continuous_target_is_a_better_merge(setup: Setup) -> None:
    model, result = run(setup, method="epmq", grid=None, experts=setup.experts, alpha=0.05)
    assert result.results == {}
    assert task_error(model, setup) < task_error(setup.merged(), setup)


def test_regmean_merge_reduces_expert_error(setup: Setup) -> None:
    model, _ = run(setup, method="regmean", experts=setup.experts, x_source="expert")
    assert task_error(model, setup) < task_error(setup.merged(), setup)


@pytest.mark.parametrize("x_source", ["merged", "expert"])
def test_x_sources_run(setup: Setup, x_source: str) -> None:
    grid = QuantGrid(4)
    model, result = run(
        setup, method="epmq", grid=grid, experts=setup.experts, alpha=0.05, x_source=x_source
    )
    assert len(result.layers) == 2 * LINEARS_PER_BLOCK
    assert result.settings["x_source"] == x_source
    gptq_model, _ = run(setup, method="gptq", grid=grid)
    assert task_error(model, setup) < task_error(gptq_model, setup)


def test_merged_target_is_gptq_with_alpha_as_damping(setup: Setup) -> None:
    """target="merged" gives W* = W_m: E-PMQ with anchor α and no extra damping is GPTQ
    with damping α (both solve GPTQ of W_m under ΣH_i + α·mean(diag ΣH_i)·I)."""
    grid = QuantGrid(4)
    gptq_model, _ = run(setup, method="gptq", grid=grid, percdamp=0.01)
    ablation, _ = run(
        setup,
        method="epmq",
        grid=grid,
        experts=setup.experts,
        alpha=0.01,
        percdamp=0.0,
        target="merged",
    )
    # The first layers solved see identical inputs: identical up to float rounding of W*.
    first = dict(gptq_model.named_parameters())["encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(
        dict(ablation.named_parameters())["encoder.layer.0.attention.self.query.weight"],
        first,
        rtol=0,
        atol=1e-6,
    )
    # Later, float noise in W* = W_m may flip a few roundings; the models stay equivalent.
    gap = max_output_gap(gptq_model, ablation, setup)
    assert gap < 0.1 * max_output_gap(gptq_model, setup.merged(), setup)


def test_merged_target_without_rounding_keeps_the_merge(setup: Setup) -> None:
    model, _ = run(
        setup, method="epmq", grid=None, experts=setup.experts, alpha=0.01, target="merged"
    )
    for (name, a), b in zip(model.named_parameters(), setup.merged().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_merged_target_with_huge_alpha_equals_rtn(setup: Setup) -> None:
    grid = QuantGrid(4)
    rtn_model, _ = run(setup, method="rtn", grid=grid)
    ablation, _ = run(
        setup, method="epmq", grid=grid, experts=setup.experts, alpha=1e9, target="merged"
    )
    for (name, a), b in zip(rtn_model.named_parameters(), ablation.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_true_sequential_off_differs_but_runs(setup: Setup) -> None:
    grid = QuantGrid(3)
    seq, _ = run(setup, method="gptq", grid=grid, true_sequential=True)
    joint, _ = run(setup, method="gptq", grid=grid, true_sequential=False)
    name = "encoder.layer.1.output.dense.weight"
    a, b = dict(seq.named_parameters())[name], dict(joint.named_parameters())[name]
    assert not torch.equal(a, b)


def test_record_is_written_as_json(setup: Setup, tmp_path) -> None:
    out = tmp_path / "run.json"
    _, result = run(
        setup, method="gptq", grid=QuantGrid(4), engine=EngineOptions(progress=False, output=out)
    )
    data = json.loads(out.read_text())
    assert data["settings"]["method"] == "gptq"
    assert [row["name"] for row in data["layers"]] == [r.name for r in result.layers]
    first = data["layers"][0]
    assert first["name"] == "encoder.layer.0.attention.self.query"
    assert first["proxy_loss"] >= 0 and first["damping"] > 0
    assert sum(first["tokens"].values()) == 3 * 2 * (4 * 10 - 3)


def test_keep_grams_for_regmean(setup: Setup) -> None:
    _, result = run(
        setup,
        method="gptq",
        grid=QuantGrid(4),
        engine=EngineOptions(progress=False, keep_grams=True),
    )
    grams = result.grams["encoder.layer.0.intermediate.dense.weight"]
    assert len(grams) == 3 and grams[0].shape == (32, 32)
    torch.testing.assert_close(grams[0], grams[0].T)
