"""ViT adapter: block replay, linear groups, loading, and the engine on tiny experts."""

from __future__ import annotations

import pytest
import torch
from block_replay import capture, run_blocks
from tiny_experts import make_experts, with_state
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from epmq.models import adapter_for
from epmq.models.vit import VitAdapter, vit_features
from solver_params import params_for


def make(cls: type, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip
    return cls(config).eval()


def pixels(n: int = 3, shift: float = 0.0, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification])
@torch.no_grad()
def test_block_replay_reproduces_forward(cls: type) -> None:
    model = make(cls)
    adapter = adapter_for(model)
    assert isinstance(adapter, VitAdapter)
    (stage,) = adapter.stages(model)
    assert stage.blocks_path == ("layers" if cls is ViTModel else "vit.layers")
    batch = {"pixel_values": pixels()}
    args, kwargs = capture(model, adapter, stage, batch)
    hidden = run_blocks(model, adapter, stage, args, kwargs)
    encoder = model if cls is ViTModel else model.vit
    want = encoder(pixel_values=batch["pixel_values"]).last_hidden_state
    torch.testing.assert_close(encoder.layernorm(hidden), want, rtol=1e-5, atol=1e-5)
    if cls is ViTForImageClassification:  # the classifier reads the class token
        logits = model(pixel_values=batch["pixel_values"]).logits
        features = vit_features(model, batch["pixel_values"])
        torch.testing.assert_close(model.classifier(features), logits)


def test_linear_groups_cover_every_linear_in_order() -> None:
    model = make(ViTModel)
    adapter = VitAdapter()
    block = adapter.blocks(model, adapter.stages(model)[0])[0]
    groups = adapter.linear_groups(block)
    assert groups == [
        ["attention.q_proj", "attention.k_proj", "attention.v_proj"],
        ["attention.o_proj"],
        ["mlp.fc1"],
        ["mlp.fc2"],
    ]
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert {n for g in groups for n in g} == linears
    assert [norm for norm, _ in adapter.norms(block)] == ["layernorm_before", "layernorm_after"]


@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification])
def test_registry_detects_and_loads_vit(cls: type, tmp_path) -> None:
    from epmq.models.registry import detect_family, load_model

    make(cls, seed=3).save_pretrained(tmp_path)
    assert detect_family(tmp_path) == "vit"
    model, adapter = load_model(tmp_path)
    assert type(model) is cls and isinstance(adapter, VitAdapter)
    torch.testing.assert_close(model.state_dict(), make(cls, seed=3).state_dict())


def test_engine_quantizes_vit() -> None:
    from epmq.calib import EngineOptions, quantize_model
    from epmq.quant import QuantGrid

    base = make(ViTModel, seed=6)
    experts = make_experts(base, ".layers.")
    merged_state = {k: (experts[0][k] + experts[1][k]) / 2 for k in experts[0]}
    calib = {
        "left": [{"pixel_values": pixels(4, shift=-1.0, seed=s)} for s in (10, 11)],
        "right": [{"pixel_values": pixels(4, shift=1.0, seed=s)} for s in (12, 13)],
    }
    merged = with_state(base, merged_state)
    models = {}
    for method, alpha in (("gptq", 0.0), ("epmq", 0.05)):
        model = with_state(base, merged_state)
        run = quantize_model(
            model, VitAdapter(), calib, method=method, grid=QuantGrid(8), experts=experts,
            **params_for(method, alpha=alpha), engine=EngineOptions(progress=False),
        )  # fmt: skip
        assert len(run.layers) == 2 * 6
        models[method] = model
    with torch.no_grad():
        for batches in calib.values():
            for batch in batches:
                got = models["gptq"](**batch).last_hidden_state
                want = merged(**batch).last_hidden_state
                assert float((got - want).abs().max()) < 0.05
