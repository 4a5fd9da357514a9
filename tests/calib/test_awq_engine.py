"""AWQ through the engine: scales folded into their producers, exact and exported like RTN.

Tolerances: CPU float32; a fold divides and its undo multiplies by the same ``s``, so the
unfolded reference matches up to float rounding (1e-5 x max |logit|); the compressed-tensors
float32 export holds the solver's scales exactly (1e-5 x max |logit|, as the export tests).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from calib_fixtures import make_base, make_calib
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import epmq.calib.block as block_module
from epmq.calib import EngineOptions, quantize_model
from epmq.export import export_checkpoint
from epmq.models.bert import BertAdapter
from epmq.models.llama import LlamaAdapter
from epmq.quant import QuantGrid

GRID = QuantGrid(4, 32)
IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(9))


def _llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=100,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # uneven channel magnitudes, as trained norms have
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(torch.rand(64) * 3 + 0.1)
            layer.post_attention_layernorm.weight.mul_(torch.rand(64) * 3 + 0.1)
    return model


def _calib() -> dict[str, list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1)
    return {"t": [{"input_ids": torch.randint(0, 100, (4, 16), generator=gen)} for _ in range(2)]}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _quantize_recording(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, **kwargs):
    """Run AWQ on ``model``, recording every fold: (block prefix, producer, s)."""
    folds: list[tuple[str, str, torch.Tensor]] = []
    fold = block_module.fold_input_scale

    def recording(block, prefix, producer, s, weights, results) -> None:
        folds.append((prefix, producer, s.clone()))
        fold(block, prefix, producer, s, weights, results)

    monkeypatch.setattr(block_module, "fold_input_scale", recording)
    run = quantize_model(
        model,
        None,
        _calib(),
        method="awq",
        grid=GRID,
        **kwargs,
        engine=EngineOptions(progress=False),
    )
    return run, folds


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_model_computes_q_of_scaled_weights_over_s(
    kv_heads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _llama(kv_heads)
    model = copy.deepcopy(base)
    run, folds = _quantize_recording(model, monkeypatch)
    producers = {p for _, p, _ in folds}
    assert {"input_layernorm", "post_attention_layernorm"} <= producers
    # o_proj reads V's channels only without grouped-query attention (else: s = 1)
    assert ("self_attn.v_proj" in producers) == (kv_heads == 4)
    for name, result in run.results.items():  # every weight is on its grid, bit for bit
        assert torch.equal(model.get_submodule(name).weight.data, result.dequantize()), name

    # The unfolded reference: base norms, readers Q / s, producer linears their own Q.
    readers = LlamaAdapter.input_producers
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for prefix, producer, s in folds:
            block = reference.get_submodule(prefix)
            original = base.get_submodule(prefix).get_submodule(producer)
            target = block.get_submodule(producer)
            if isinstance(target, torch.nn.Linear):
                target.weight.mul_(s[:, None])
            else:
                target.weight.copy_(original.weight)
            for reader in (r for r, p in readers.items() if p == producer):
                block.get_submodule(reader).weight.div_(s)
    want, got = _logits(reference), _logits(model)
    tol = 1e-5 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    assert float((_logits(base) - got).abs().max()) > 50 * tol  # quantization moved them


def test_awq_beats_rtn_on_every_shared_input() -> None:
    """Same statistics for both (``x_source="merged"``): per group of linears reading one
    input the summed loss is at most RTN's; linears alone on their input are never worse."""
    base = _llama(4)
    kwargs = dict(grid=GRID, x_source="merged", engine=EngineOptions(progress=False))
    awq = quantize_model(copy.deepcopy(base), None, _calib(), method="awq", **kwargs)
    rtn = quantize_model(copy.deepcopy(base), None, _calib(), method="rtn", **kwargs)
    ours = {r.name: r.proxy_loss for r in awq.layers}
    theirs = {r.name: r.proxy_loss for r in rtn.layers}
    assert ours.keys() == theirs.keys()
    groups: dict[tuple[str, str], list[str]] = {}
    for name in ours:
        prefix, _, linear = name.partition(".self_attn.")
        if not linear:
            prefix, _, linear = name.partition(".mlp.")
            linear = f"mlp.{linear}"
        else:
            linear = f"self_attn.{linear}"
        groups.setdefault((prefix, LlamaAdapter.input_producers[linear]), []).append(name)
    for key, names in groups.items():
        a, r = sum(ours[n] for n in names), sum(theirs[n] for n in names)
        assert a <= r * (1 + 1e-6), key
    assert sum(ours.values()) < 0.95 * sum(theirs.values())


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_export_reloads_the_quantized_model(tmp_path: Path) -> None:
    from transformers import CompressedTensorsConfig

    pytest.importorskip("compressed_tensors")
    model = _llama(4)
    run = quantize_model(
        model,
        None,
        _calib(),
        method="awq",
        grid=GRID,
        clip=True,
        engine=EngineOptions(progress=False),
    )
    out = tmp_path / "ct"
    export_checkpoint(model, run.results, out, format="compressed-tensors", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    want, got = _logits(model), _logits(loaded)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    for name in ("model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm"):
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)


class _Stop(Exception):
    pass


def _stop_after_block_0(stage: str, index: int) -> None:
    if index == 0:
        raise _Stop


def test_resume_replays_folded_biases(tmp_path: Path) -> None:
    """BERT folds ``1/s`` into V's rows and bias (V -> attention output): a run resumed from
    the block checkpoint holds the same tensors as the uninterrupted one."""

    def merged() -> torch.nn.Module:
        model = make_base()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # non-zero biases, so that folding them matters
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        return model

    calib, kwargs = make_calib(), dict(method="awq", grid=QuantGrid(3, 16))
    full = merged()
    quantize_model(full, BertAdapter(), calib, **kwargs)
    value = "encoder.layer.1.attention.self.value.bias"
    assert not torch.equal(full.get_parameter(value), merged().get_parameter(value))  # folded
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Stop):
        quantize_model(
            merged(),
            BertAdapter(),
            calib,
            **kwargs,
            engine=EngineOptions(checkpoint_dir=ckpt, on_block_end=_stop_after_block_0),
        )
    resumed = merged()
    run = quantize_model(
        resumed, BertAdapter(), calib, **kwargs, engine=EngineOptions(checkpoint_dir=ckpt)
    )
    assert run.resumed_blocks == 1
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
