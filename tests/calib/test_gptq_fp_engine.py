"""The fp-target GPTQ baseline (``gptq-fp``) through the engine on the tiny BERT: the merged
model's own stream runs beside the quantized one, the first block's first linears are plain
GPTQ, the fp-target loss is at most GPTQ's, bias correction and resume work.

Tolerances: the loss comparison allows nothing (it sums over every linear); the refit biases
equal the minimiser from the recorded inputs up to float32 rounding (1e-5 x max |b|).
"""

from __future__ import annotations

import pytest
import torch
from calib_fixtures import Setup, linear_inputs

from epmq.calib import EngineOptions, quantize_model
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid

GRID = QuantGrid(3, group_size=16)
QKV = [f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]


def _run(setup: Setup, method: str, **params):  # type: ignore[no-untyped-def]
    model = setup.merged()
    run = quantize_model(
        model, BertAdapter(), setup.calib, method=method, grid=GRID, **params,
        engine=EngineOptions(progress=False),
    )  # fmt: skip
    return model, run


@torch.no_grad()
def _fp_loss(model: torch.nn.Module, setup: Setup) -> float:
    """``Σ_layers Σ_i mean_t ‖Q x_t^q − W_m x_t^fp‖²`` on the calibration data (the inputs a
    linear's solve saw are the final quantized model's: nothing after it changes them)."""
    merged = setup.merged()
    total = 0.0
    for batches in setup.calib.values():
        xq, xfp = linear_inputs(model, batches), linear_inputs(merged, batches)
        for name, x in xq.items():
            q = model.get_submodule(name).weight.double()
            w_m = merged.get_submodule(name).weight.double()
            total += float(((x @ q.T - xfp[name] @ w_m.T) ** 2).sum(1).mean())
    return total


def test_fp_targets_beat_gptq_and_start_as_gptq(setup: Setup) -> None:
    fp_model, fp_run = _run(setup, "gptq-fp")
    gptq_model, gptq_run = _run(setup, "gptq")
    for name in QKV:  # X^fp = X^q before anything is quantized: the same codes as GPTQ
        assert torch.equal(fp_run.results[name].codes, gptq_run.results[name].codes), name
    later = [n for n in fp_run.results if n.startswith("encoder.layer.1.")]
    assert any(
        not torch.equal(fp_run.results[n].codes, gptq_run.results[n].codes) for n in later
    )  # downstream the targets differ
    assert _fp_loss(fp_model, setup) <= _fp_loss(gptq_model, setup)
    assert fp_run.settings["method"] == "gptq-fp" and fp_run.settings["experts"] is None


@torch.no_grad()
def test_bias_correction_fits_the_merged_models_outputs(setup: Setup) -> None:
    model, _ = _run(setup, "gptq-fp", bias_correction=True)
    merged = setup.merged()
    xq = [linear_inputs(model, b) for b in setup.calib.values()]
    xfp = [linear_inputs(merged, b) for b in setup.calib.values()]
    for name in xq[0]:
        q, b = model.get_submodule(name).weight.double(), model.get_submodule(name).bias.double()
        w_m = merged.get_submodule(name).weight.double()
        b_m = merged.get_submodule(name).bias.double()
        best = sum(
            w_m @ f[name].mean(0) + b_m - q @ x[name].mean(0) for x, f in zip(xq, xfp, strict=True)
        ) / len(xq)
        assert torch.allclose(b, best, atol=1e-5 * float(best.abs().max()), rtol=0), name


class Interrupt(Exception):
    pass


def _stop(stage: str, index: int) -> None:
    if index == 0:
        raise Interrupt


def test_resume_equals_uninterrupted(setup: Setup, tmp_path) -> None:
    """The merged stream is rebuilt on replay (from the replayed block's snapshot)."""
    full, _ = _run(setup, "gptq-fp", bias_correction=True)
    kwargs = dict(method="gptq-fp", grid=GRID, bias_correction=True)
    with pytest.raises(Interrupt):
        quantize_model(
            setup.merged(), BertAdapter(), setup.calib, **kwargs,
            engine=EngineOptions(checkpoint_dir=tmp_path, on_block_end=_stop, progress=False),
        )  # fmt: skip
    resumed = setup.merged()
    run = quantize_model(
        resumed, BertAdapter(), setup.calib, **kwargs,
        engine=EngineOptions(checkpoint_dir=tmp_path, progress=False),
    )  # fmt: skip
    assert run.resumed_blocks == 1
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
