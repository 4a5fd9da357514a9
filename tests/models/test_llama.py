"""Llama-style adapter: block replay (Llama, Mistral, Qwen2), loading, continuation scoring,
and the engine on tiny experts."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from block_replay import capture, run_blocks
from tiny_experts import make_experts, with_state
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from epmq.errors import EpmqError
from epmq.models import adapter_for
from epmq.models.adapter import CACHE_KWARGS
from epmq.models.llama import LlamaAdapter, continuation_log_likelihoods, score_continuations
from solver_params import params_for

SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)
WORDS = ["review", ":", "great", "awful", "film", "sentiment", "positive", "negative", "very"]


def make(cls: type = LlamaForCausalLM, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = {
        LlamaForCausalLM: LlamaConfig,
        LlamaModel: LlamaConfig,
        MistralForCausalLM: MistralConfig,
        Qwen2ForCausalLM: Qwen2Config,
    }[cls](**SIZES)
    return cls(config).eval()


def batch(seed: int = 3, low: int = 0, high: int = 100, pad: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")


# -- adapter level ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM])
@pytest.mark.parametrize("pad", [True, False])
@torch.no_grad()
def test_block_replay_reproduces_logits(cls: type, pad: bool) -> None:
    model = make(cls)
    adapter = adapter_for(model)
    assert isinstance(adapter, LlamaAdapter)
    (stage,) = adapter.stages(model)
    assert stage.blocks_path == "model.layers"
    data = batch(pad=pad)
    args, kwargs = capture(model, adapter, stage, data)
    assert kwargs["use_cache"] is False
    caches = [name for name in CACHE_KWARGS if name in kwargs]
    assert caches and all(kwargs[name] is None for name in caches)
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[-2:] == sin.shape[-2:] == (8, 8)  # head_dim 32 / 4 heads
    torch.testing.assert_close(
        adapter.hidden_states(args, kwargs), model.model.embed_tokens(data["input_ids"])
    )
    hidden = model.model.norm(run_blocks(model, adapter, stage, args, kwargs))
    want = model(**data, use_cache=False).logits
    torch.testing.assert_close(model.lm_head(hidden), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(adapter.token_mask(stage, data), data["attention_mask"].bool())


def test_bare_model_has_layers_at_top() -> None:
    model = make(LlamaModel)
    adapter = LlamaAdapter()
    (stage,) = adapter.stages(model)
    assert stage.blocks_path == "layers"
    data = batch()
    args, kwargs = capture(model, adapter, stage, data)
    hidden = model.norm(run_blocks(model, adapter, stage, args, kwargs))
    torch.testing.assert_close(hidden, model(**data).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_linear_groups() -> None:
    model = make()
    adapter = LlamaAdapter()
    block = adapter.blocks(model, adapter.stages(model)[0])[1]
    assert adapter.linear_groups(block) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_mixed_sliding_window_layers_are_refused() -> None:
    config = Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert len(set(config.layer_types)) == 2
    model = Qwen2ForCausalLM(config).eval()
    with pytest.raises(EpmqError, match="layer_types"):
        LlamaAdapter().stages(model)


def test_batch_without_ids_is_a_user_error() -> None:
    with pytest.raises(EpmqError, match="input_ids"):
        LlamaAdapter().run_model(make(), {"attention_mask": torch.ones(1, 3)})


@pytest.mark.parametrize("cls", [LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM])
def test_save_and_load(cls: type, tmp_path) -> None:
    model = make(cls, seed=4)
    model.save_pretrained(tmp_path)
    loaded = LlamaAdapter.load(tmp_path)
    assert type(loaded) is cls and not loaded.training
    want = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)


def test_load_refuses_other_families(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(EpmqError, match="gpt2"):
        LlamaAdapter.load(tmp_path)


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def by_hand(model: nn.Module, tok: Any, prompt: str, label: str) -> float:
    head = tok(prompt)["input_ids"]
    cont = tok(label, add_special_tokens=False)["input_ids"]
    logp = model(input_ids=torch.tensor([head + cont])).logits[0].log_softmax(-1)
    return float(sum(logp[len(head) - 1 + j, t] for j, t in enumerate(cont)))


def test_continuation_scores_match_hand_computed() -> None:
    model = make(seed=5)
    tok = tokenizer()
    prompts = ["review : great film sentiment :", "review : awful", "film"]
    labels = ["positive", "negative", "very negative"]
    scores = continuation_log_likelihoods(model, tok, prompts, labels)
    want = torch.tensor([[by_hand(model, tok, p, lab) for lab in labels] for p in prompts])
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(score_continuations(model, tok, prompts, labels), want.argmax(dim=1))


def test_a_label_beats_its_own_extension() -> None:
    # log p(a b) = log p(a) + log p(b | a) < log p(a)
    preds = score_continuations(
        make(seed=6), tokenizer(), ["review :", "film"], ["great film", "great"]
    )
    assert preds.tolist() == [1, 1]


def test_empty_label_is_a_user_error() -> None:
    with pytest.raises(EpmqError, match="tokenizes to nothing"):
        score_continuations(make(), tokenizer(), ["film"], ["great", ""])


# -- engine level -----------------------------------------------------------------------------
@torch.no_grad()
def hidden(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """Final (normed) hidden states of real tokens: unit scale, unlike the tiny logits."""
    out = [model.model(**b, use_cache=False).last_hidden_state for b in batches]
    return [h[b["attention_mask"].bool()] for h, b in zip(out, batches, strict=True)]


def test_engine_quantizes_llama(tmp_path) -> None:
    from epmq.calib import EngineOptions, quantize_model
    from epmq.quant import QuantGrid

    base = make(seed=8)
    experts = make_experts(base, ".layers.")
    merged_state = {k: (experts[0][k] + experts[1][k]) / 2 for k in experts[0]}
    folders = []
    for i, state in enumerate(experts):  # experts read block by block from safetensors folders
        expert = with_state(base, state)
        expert.save_pretrained(tmp_path / f"expert{i}")
        folders.append(tmp_path / f"expert{i}")
    calib = {
        "low": [batch(seed=s, low=0, high=50) for s in (10, 11)],
        "high": [batch(seed=s, low=50, high=100) for s in (12, 13)],
    }
    merged = with_state(base, merged_state)
    done = {}
    for method, alpha in (("gptq", 0.0), ("epmq", 0.05)):
        model = with_state(base, merged_state)
        run = quantize_model(
            model,
            LlamaAdapter(),
            calib,
            method=method,
            grid=QuantGrid(8),
            experts=folders,
            **params_for(method, alpha=alpha),
            engine=EngineOptions(progress=False),
        )
        assert len(run.layers) == 2 * 7
        done[method] = model
    for batches in calib.values():
        pairs = zip(hidden(done["gptq"], batches), hidden(merged, batches), strict=True)
        assert max(float((a - b).abs().max()) for a, b in pairs) < 0.05
    for i, batches in enumerate(calib.values()):
        expert = with_state(base, experts[i])
        errors = {}
        for method, model in done.items():
            pairs = zip(hidden(model, batches), hidden(expert, batches), strict=True)
            errors[method] = sum(float(((a - b) ** 2).sum()) for a, b in pairs)
        assert errors["epmq"] < 0.8 * errors["gptq"]


# -- registry ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "family"),
    [
        ("bert", "bert"),
        ("roberta", "bert"),
        ("xlm-roberta", "bert"),
        ("camembert", "bert"),
        ("clip", "clip"),
        ("clip_vision_model", "clip"),
        ("t5", "t5"),
        ("llama", "llama"),
        ("mistral", "llama"),
        ("qwen2", "llama"),
    ],
)
def test_registry_maps_model_types(model_type: str, family: str, tmp_path) -> None:
    from epmq.models.registry import adapter_for_folder, detect_family

    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    assert detect_family(tmp_path) == family
    assert adapter_for_folder(tmp_path).family == family


def test_registry_loads_llama(tmp_path) -> None:
    from epmq.models.registry import load_model

    make(MistralForCausalLM).save_pretrained(tmp_path)
    model, adapter = load_model(tmp_path)
    assert type(model) is MistralForCausalLM and isinstance(adapter, LlamaAdapter)


def test_registry_rejects_unknown_and_broken_folders(tmp_path) -> None:
    from epmq.models.registry import adapter_class, detect_family

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    folder = re.escape(str(tmp_path))
    with pytest.raises(EpmqError, match=rf"{folder}.*'gpt2'.*clip_vision_model.*qwen2"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EpmqError, match="not valid JSON"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": []}')
    with pytest.raises(EpmqError, match="model_type"):
        detect_family(tmp_path)
    with pytest.raises(EpmqError, match=r"no config\.json"):
        detect_family(tmp_path / "missing")
    with pytest.raises(EpmqError, match="unknown model family 'gpt'"):
        adapter_class("gpt")
