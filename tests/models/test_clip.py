"""CLIP vision adapter: block replay, loading, zero-shot heads, and the engine on tiny experts."""

from __future__ import annotations

import pytest
import torch
from block_replay import capture, run_blocks
from tiny_experts import make_experts, with_state
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
)

from epmq.errors import EpmqError
from epmq.models import adapter_for
from epmq.models.clip import (
    ClipVisionAdapter,
    classify,
    image_features,
    vision_tower,
    zero_shot_head,
)
from solver_params import params_for

WORDS = ["a", "photo", "of", "cat", "dog", "car", "bird", "picture", "blurry"]


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )


def clip_config() -> CLIPConfig:
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(WORDS) + 4,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPConfig(text_config=text, vision_config=vision_config().to_dict(), projection_dim=16)


def make(cls: type, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = clip_config() if cls is CLIPModel else vision_config()
    return cls(config).eval()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "<bos>": 2, "<eos>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="<bos>", eos_token="<eos>"
    )


def pixels(n: int = 3, shift: float = 0.0, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen) + shift


# -- adapter level ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel])
@torch.no_grad()
def test_block_replay_reproduces_forward(cls: type) -> None:
    model = make(cls)
    adapter = adapter_for(model)
    assert isinstance(adapter, ClipVisionAdapter)
    (stage,) = adapter.stages(model)
    prefix = "" if cls is CLIPVisionModel else "vision_model."
    assert stage.blocks_path == f"{prefix}encoder.layers"
    batch = {"pixel_values": pixels()}
    args, kwargs = capture(model, adapter, stage, batch)
    tower = vision_tower(model)
    first = tower.pre_layrnorm(tower.embeddings(batch["pixel_values"]))
    torch.testing.assert_close(adapter.hidden_states(args, kwargs), first)
    hidden = run_blocks(model, adapter, stage, args, kwargs)
    want = tower(pixel_values=batch["pixel_values"]).last_hidden_state
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
    assert adapter.token_mask(stage, batch) is None


def test_linear_groups_cover_every_linear_in_order() -> None:
    model = make(CLIPVisionModel)
    adapter = ClipVisionAdapter()
    block = adapter.blocks(model, adapter.stages(model)[0])[0]
    groups = adapter.linear_groups(block)
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.out_proj"],
        ["mlp.fc1"],
        ["mlp.fc2"],
    ]
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert {n for g in groups for n in g} == linears


def test_batch_without_pixels_is_a_user_error() -> None:
    model = make(CLIPVisionModel)
    with pytest.raises(EpmqError, match="pixel_values"):
        ClipVisionAdapter().run_model(model, {"input_ids": torch.zeros(1, 3)})


@pytest.mark.parametrize("cls", [CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel])
def test_save_and_load(cls: type, tmp_path) -> None:
    model = make(cls, seed=3)
    model.save_pretrained(tmp_path)
    loaded = ClipVisionAdapter.load(tmp_path)
    assert type(loaded) is cls
    assert not loaded.training
    want = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)


def test_load_rejects_missing_folder(tmp_path) -> None:
    with pytest.raises(EpmqError, match=str(tmp_path)):
        ClipVisionAdapter.load(tmp_path)


# -- heads ------------------------------------------------------------------------------------
@torch.no_grad()
def test_zero_shot_head_matches_clip_logits() -> None:
    model = make(CLIPModel, seed=1)
    tok = tokenizer()
    classes = ["cat", "dog", "car"]
    head = zero_shot_head(model, tok, classes, ["a photo of a {}"])
    assert head.weight.shape == (3, 16) and head.bias is None
    images = pixels(4)
    prompts = tok([f"a photo of a {c}" for c in classes], padding=True, return_tensors="pt")
    want = model(pixel_values=images, **prompts).logits_per_image
    torch.testing.assert_close(classify(model, head, images), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_zero_shot_head_averages_normalised_templates() -> None:
    model = make(CLIPModel, seed=2)
    tok = tokenizer()
    templates = ["a photo of a {}", lambda c: f"a blurry picture of a {c}"]
    head = zero_shot_head(model, tok, ["bird", "dog"], templates)
    scale = model.logit_scale.exp()
    torch.testing.assert_close(head.weight.norm(dim=1), scale.expand(2))
    texts = tok(
        ["a photo of a bird", "a blurry picture of a bird"], padding=True, return_tensors="pt"
    )
    emb = model.get_text_features(**texts).pooler_output
    emb = emb / emb.norm(dim=-1, keepdim=True)
    mean = emb.mean(0)
    torch.testing.assert_close(head.weight[0], scale * mean / mean.norm())


@torch.no_grad()
def test_image_features_of_every_class_agree() -> None:
    full = make(CLIPModel, seed=4)
    images = pixels(2)
    want = image_features(full, images)
    with_proj = CLIPVisionModelWithProjection(vision_config()).eval()
    with_proj.vision_model.load_state_dict(full.vision_model.state_dict())
    with_proj.visual_projection.load_state_dict(full.visual_projection.state_dict())
    bare = CLIPVisionModel(vision_config()).eval()
    bare.load_state_dict(full.vision_model.state_dict())
    torch.testing.assert_close(image_features(with_proj, images), want)
    torch.testing.assert_close(image_features(bare, images, full.visual_projection), want)
    torch.testing.assert_close(want.norm(dim=-1), torch.ones(2))


def test_zero_shot_head_needs_text_tower() -> None:
    with pytest.raises(EpmqError, match="CLIPVisionModel"):
        zero_shot_head(make(CLIPVisionModel), tokenizer(), ["cat"], ["{}"])


# -- engine level -----------------------------------------------------------------------------
@torch.no_grad()
def outputs(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    return [model(**b).last_hidden_state for b in batches]


def test_engine_quantizes_clip_vision() -> None:
    from epmq.calib import EngineOptions, quantize_model
    from epmq.quant import QuantGrid

    base = make(CLIPVisionModel, seed=6)
    experts = make_experts(base, ".layers.")
    merged_state = {k: (experts[0][k] + experts[1][k]) / 2 for k in experts[0]}
    calib = {
        "left": [{"pixel_values": pixels(4, shift=-1.0, seed=s)} for s in (10, 11)],
        "right": [{"pixel_values": pixels(4, shift=1.0, seed=s)} for s in (12, 13)],
    }
    merged = with_state(base, merged_state)
    models = {}
    # (method, alpha): E-PMQ with a huge anchor is GPTQ of the merge; a small one follows experts
    for method, alpha in (("gptq", 0.0), ("epmq", 1e4), ("epmq", 0.05)):
        model = with_state(base, merged_state)
        run = quantize_model(
            model,
            ClipVisionAdapter(),
            calib,
            method=method,
            grid=QuantGrid(8),
            experts=experts,
            **params_for(method, alpha=alpha),
            engine=EngineOptions(progress=False),
        )
        assert len(run.layers) == 2 * 6
        models[(method, alpha)] = model
    for key in (("gptq", 0.0), ("epmq", 1e4)):
        for batches in calib.values():
            pairs = zip(outputs(models[key], batches), outputs(merged, batches), strict=True)
            assert max(float((a - b).abs().max()) for a, b in pairs) < 0.05
    for i, batches in enumerate(calib.values()):
        expert = with_state(base, experts[i])
        errors = {}
        for key in (("gptq", 0.0), ("epmq", 0.05)):
            pairs = zip(outputs(models[key], batches), outputs(expert, batches), strict=True)
            errors[key[0]] = sum(float(((a - b) ** 2).sum()) for a, b in pairs)
        assert errors["epmq"] < 0.8 * errors["gptq"]


# -- registry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CLIPVisionModel, CLIPModel])
def test_registry_detects_and_loads_clip(cls: type, tmp_path) -> None:
    from epmq.models.registry import adapter_for_folder, detect_family, load_model

    make(cls).save_pretrained(tmp_path)
    assert detect_family(tmp_path) == "clip"
    assert isinstance(adapter_for_folder(tmp_path), ClipVisionAdapter)
    model, adapter = load_model(tmp_path)
    assert type(model) is cls and isinstance(adapter, ClipVisionAdapter)


def test_legacy_prefixed_vision_expert_resolves(tmp_path) -> None:
    # FusionBench-style CLIPVisionModel folders name tensors "vision_model.encoder.layers..."
    from safetensors.torch import save_file

    from epmq.calib import SafetensorsExpert

    model = make(CLIPVisionModel)
    state = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    expert = SafetensorsExpert(tmp_path)
    name = "encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(expert.tensor(name), model.state_dict()[name])
