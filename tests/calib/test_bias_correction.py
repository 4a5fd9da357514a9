"""Bias correction (``bias_correction=True``, GPTQ and E-PMQ): the closed form, its effect on
the per-task output error, resume, and layers without a bias.

Tolerances: the closed form against ``torch.linalg.lstsq`` in float64 (1e-9); the error
comparison is exact in principle (the corrected bias is the minimiser over ``b`` with ``Q`` and
the inputs fixed), so per layer it allows float32 rounding (1e-6 relative); the refit bias
equals the minimiser computed from the recorded inputs up to float32 rounding (1e-5 x its
largest entry).
"""

from __future__ import annotations

import copy

import pytest
import torch
from calib_fixtures import Setup, linear_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from epmq.calib import EngineOptions, quantize_model
from epmq.models.bert import BertAdapter
from epmq.quant import GramAccumulator, QuantGrid
from epmq.quant.bias import corrected_bias

GRID = QuantGrid(3, group_size=16)


def test_closed_form_equals_least_squares() -> None:
    """``b`` from the accumulators' means equals lstsq over the stacked per-task residuals
    ``sqrt(w_i / n_i) (b − (W_i x̃_t + b_i − Q x_t))``."""
    gen = torch.Generator().manual_seed(0)
    out, dim, weights = 5, 7, [1.0, 0.5, 2.0]
    q = torch.randn(out, dim, generator=gen, dtype=torch.float64)
    rows, rhs, means, tilde, targets = [], [], [], [], []
    for i, w in enumerate(weights):
        n = 11 + 4 * i
        x = torch.randn(n, dim, generator=gen, dtype=torch.float64) + i
        xt = x + 0.3 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
        w_i = q + 0.2 * torch.randn(out, dim, generator=gen, dtype=torch.float64)
        b_i = torch.randn(out, generator=gen, dtype=torch.float64)
        acc = GramAccumulator(dim, dtype=torch.float64, cross=True, means=True)
        acc.add(x[:5], xt[:5])
        acc.add(x[5:], xt[5:])
        assert acc.mean is not None and acc.cross_mean is not None
        means.append(acc.mean)
        tilde.append(acc.cross_mean)
        targets.append((w_i, b_i))
        scale = (w / n) ** 0.5
        rows.append(torch.full((n, 1), scale, dtype=torch.float64))
        rhs.append(scale * (xt @ w_i.T + b_i - x @ q.T))
    brute = torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)).solution[0]
    got = corrected_bias(q, means, targets, target_means=tilde, task_weights=weights)
    assert torch.allclose(got, brute, atol=1e-9, rtol=0)
    # without expert inputs (μ̃ = μ) and with the merged targets: b_m + (W_m − Q) μ̄
    w_m, b_m = targets[0]
    merged = corrected_bias(q, means, [(w_m, b_m)] * 3, task_weights=weights)
    mean = sum(w * m for w, m in zip(weights, means, strict=True)) / sum(weights)
    assert torch.allclose(merged, b_m + (w_m - q) @ mean, atol=1e-9, rtol=0)


def _error(q: torch.Tensor, b: torch.Tensor, xs, targets) -> float:
    """``Σ_i mean_t ‖Q x_t + b − (W_i x̃_t + b_i)‖²`` (every task weighs 1)."""
    total = 0.0
    for x, (w_i, b_i, xt) in zip(xs, targets, strict=True):
        diff = x @ q.T + b - (xt @ w_i.T + b_i)
        total += float((diff**2).sum(1).mean())
    return total


@pytest.mark.parametrize("x_source", ["quantized", "expert"])
@torch.no_grad()
def test_correction_lowers_every_layers_output_error(setup: Setup, x_source: str) -> None:
    """E-PMQ with expert targets: with the same Q and the same calibration inputs (those of the
    quantized model, which a linear's solve saw: nothing after it changes them), every linear's
    error against its experts is at most with the merged bias, and lower in total."""
    model = setup.merged()
    quantize_model(
        model, BertAdapter(), setup.calib, method="epmq", grid=GRID, experts=setup.experts,
        x_source=x_source, alpha=0.05, bias_correction=True,
        engine=EngineOptions(progress=False),
    )  # fmt: skip
    merged = setup.merged()
    tasks = list(setup.calib)
    xs = [linear_inputs(model, setup.calib[t]) for t in tasks]
    experts = [setup.expert_model(i) for i in range(len(tasks))]
    if x_source == "expert":
        xts = [linear_inputs(e, setup.calib[t]) for e, t in zip(experts, tasks, strict=True)]
    else:
        xts = xs
    corrected = uncorrected = 0.0
    names = sorted(xs[0])
    assert len(names) == 12
    for name in names:
        layer = model.get_submodule(name)
        q, b = layer.weight.double(), layer.bias.double()
        b_m = merged.get_submodule(name).bias.double()
        assert not torch.equal(b, b_m), name  # the bias was refit
        targets = [
            (e.get_submodule(name).weight.double(), e.get_submodule(name).bias.double(), xt[name])
            for e, xt in zip(experts, xts, strict=True)
        ]
        # the minimiser over b on these very inputs: mean_i (W_i mean x̃ + b_i − Q mean x)
        best = sum(w_i @ xt.mean(0) + b_i - q @ x[name].mean(0) for (w_i, b_i, xt), x in zip(
            targets, xs, strict=True
        )) / len(tasks)  # fmt: skip
        assert torch.allclose(b, best, atol=1e-5 * float(best.abs().max()), rtol=0), name
        ours = _error(q, b, [x[name] for x in xs], targets)
        theirs = _error(q, b_m, [x[name] for x in xs], targets)
        assert ours <= theirs * (1 + 1e-6), name
        corrected += ours
        uncorrected += theirs
    assert corrected < 0.99 * uncorrected


def test_off_by_default_keeps_the_merged_biases(setup: Setup) -> None:
    model = setup.merged()
    quantize_model(
        model, BertAdapter(), setup.calib, method="gptq", grid=GRID,
        engine=EngineOptions(progress=False),
    )  # fmt: skip
    merged = setup.merged()
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(param, merged.get_parameter(name)), name


class Interrupt(Exception):
    pass


def _stop_after_first_block(stage: str, index: int) -> None:
    if index == 0:
        raise Interrupt


@pytest.mark.parametrize(("method", "x_source"), [("gptq", "quantized"), ("epmq", "expert")])
def test_resume_replays_the_corrected_biases(
    setup: Setup, tmp_path, method: str, x_source: str
) -> None:
    kwargs = dict(
        method=method, grid=GRID, experts=setup.experts, x_source=x_source,
        bias_correction=True,
    )  # fmt: skip
    full = setup.merged()
    quantize_model(full, BertAdapter(), setup.calib, **kwargs, engine=EngineOptions(progress=False))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        quantize_model(
            setup.merged(), BertAdapter(), setup.calib, **kwargs,
            engine=EngineOptions(
                checkpoint_dir=ckpt, on_block_end=_stop_after_first_block, progress=False
            ),
        )  # fmt: skip
    resumed = setup.merged()
    run = quantize_model(
        resumed, BertAdapter(), setup.calib, **kwargs,
        engine=EngineOptions(checkpoint_dir=ckpt, progress=False),
    )  # fmt: skip
    assert run.resumed_blocks == 1
    merged = setup.merged()
    moved = 0
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
        moved += name.endswith(".bias") and not torch.equal(a, merged.get_parameter(name))
    assert moved >= 12


def _llama(attention_bias: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=50, attention_bias=attention_bias, mlp_bias=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model


def test_layers_without_bias_stay_without_bias() -> None:
    """Llama with attention biases only: q/k/v/o biases are refit, the MLP gets none."""
    base = _llama(attention_bias=True)
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    calib = {"t": [{"input_ids": torch.randint(0, 50, (4, 12), generator=gen)}]}
    quantize_model(
        model, None, calib, method="gptq", grid=GRID, bias_correction=True,
        engine=EngineOptions(progress=False),
    )  # fmt: skip
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in base.named_parameters()}
    for layer in model.model.layers:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert getattr(layer.mlp, proj).bias is None
    moved = [
        n for n in names if n.endswith(".bias") and not torch.equal(
            model.get_parameter(n), base.get_parameter(n)
        )
    ]  # fmt: skip
    assert len(moved) == 8  # q, k, v, o of both layers
