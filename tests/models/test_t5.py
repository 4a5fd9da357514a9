"""T5 adapter: two-stage block replay, loading, label-word scoring, and the engine on experts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from block_replay import capture, run_blocks
from tiny_experts import make_experts, with_state
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

from epmq.errors import EpmqError
from epmq.models import adapter_for
from epmq.models.t5 import (
    T5Adapter,
    decoder_inputs,
    label_word_log_likelihoods,
    score_label_words,
    shift_right,
)
from solver_params import params_for

WORDS = ["yes", "no", "maybe", "great", "film", "bad", "movie", "is", "the", "very"]


def config(gated: bool = True) -> T5Config:
    return T5Config(
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        d_kv=16,
        vocab_size=100,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
    )


def test_shift_right_starts_from_pad_when_no_start_token() -> None:
    model = make()
    labels = torch.tensor([[5, 6, -100]])
    assert shift_right(model, labels).tolist() == [[0, 5, 6]]
    model.config.decoder_start_token_id = 9
    assert shift_right(model, labels).tolist() == [[9, 5, 6]]


def make(seed: int = 0, gated: bool = True) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config(gated)).eval()


def batch(seed: int = 3, enc_len: int = 7, dec_len: int = 5, low: int = 2, high: int = 100) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (3, enc_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, enc_len - 2 :] = 0
    labels = torch.randint(low, high, (3, dec_len), generator=gen)
    labels[1, dec_len - 2 :] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenizer(eos: bool) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 1)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


# -- adapter level ----------------------------------------------------------------------------
@pytest.mark.parametrize("gated", [True, False])
@torch.no_grad()
def test_two_stage_replay_reproduces_encoder_and_logits(gated: bool) -> None:
    model = make(gated=gated)
    adapter = adapter_for(model)
    assert isinstance(adapter, T5Adapter)
    encoder, decoder = adapter.stages(model)
    assert (encoder.blocks_path, decoder.blocks_path) == ("encoder.block", "decoder.block")
    data = batch()
    want = model(**decoder_inputs(model, data), use_cache=False)

    args, kwargs = capture(model, adapter, encoder, data)
    assert args == () and kwargs["position_bias"] is None
    enc_hidden = run_blocks(model, adapter, encoder, args, kwargs)
    encoded = model.encoder.final_layer_norm(enc_hidden)
    torch.testing.assert_close(encoded, want.encoder_last_hidden_state, rtol=1e-5, atol=1e-5)

    args, kwargs = capture(model, adapter, decoder, data)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], encoded, rtol=1e-5, atol=1e-5)
    linked = adapter.link_stage(model, decoder, enc_hidden, args, kwargs)[1]
    torch.testing.assert_close(linked["encoder_hidden_states"], encoded, rtol=0, atol=0)
    torch.testing.assert_close(
        kwargs["hidden_states"], model.shared(shift_right(model, data["labels"]))
    )
    hidden = model.decoder.final_layer_norm(run_blocks(model, adapter, decoder, args, kwargs))
    if model.config.scale_decoder_outputs:
        hidden = hidden * model.config.d_model**-0.5
    torch.testing.assert_close(model.lm_head(hidden), want.logits, rtol=1e-5, atol=1e-5)


def test_later_blocks_get_the_first_blocks_position_bias() -> None:
    model = make()
    adapter = T5Adapter()
    encoder = adapter.stages(model)[0]
    args, kwargs = capture(model, adapter, encoder, batch())
    out = adapter.blocks(model, encoder)[0](*args, **kwargs)
    _, after = adapter.next_block_inputs(encoder, 0, out, args, kwargs)
    assert after["position_bias"] is out[1]
    assert after["position_bias"].shape == (1, 2, 7, 7)
    with pytest.raises(EpmqError, match="tuple"):
        adapter.next_block_inputs(encoder, 0, out[0], args, kwargs)


@pytest.mark.parametrize("gated", [True, False])
def test_linear_groups(gated: bool) -> None:
    model = make(gated=gated)
    adapter = T5Adapter()
    encoder, decoder = adapter.stages(model)
    wi = (
        ["layer.{f}.DenseReluDense.wi_0", "layer.{f}.DenseReluDense.wi_1"]
        if gated
        else ["layer.{f}.DenseReluDense.wi"]
    )
    attn = ["layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v"]
    cross = ["layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v"]
    enc_groups = adapter.linear_groups(adapter.blocks(model, encoder)[1])
    assert enc_groups == [
        attn,
        ["layer.0.SelfAttention.o"],
        [w.format(f=1) for w in wi],
        ["layer.1.DenseReluDense.wo"],
    ]
    dec_groups = adapter.linear_groups(adapter.blocks(model, decoder)[0])
    assert dec_groups == [
        attn,
        ["layer.0.SelfAttention.o"],
        cross,
        ["layer.1.EncDecAttention.o"],
        [w.format(f=2) for w in wi],
        ["layer.2.DenseReluDense.wo"],
    ]


def test_token_masks() -> None:
    adapter = T5Adapter()
    model = make()
    encoder, decoder = adapter.stages(model)
    data = batch(enc_len=7, dec_len=5)
    assert torch.equal(adapter.token_mask(encoder, data), data["attention_mask"].bool())
    assert torch.equal(adapter.token_mask(decoder, data), data["labels"] != -100)
    # same lengths: the decoder mask stays; the cross-attention k/v get the encoder's
    same = batch(enc_len=5, dec_len=5)
    assert torch.equal(adapter.token_mask(decoder, same), same["labels"] != -100)
    for name in ("layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v"):
        got = adapter.linear_token_mask(decoder, same, name)
        assert torch.equal(got, same["attention_mask"].bool())
        assert torch.equal(adapter.linear_token_mask(encoder, same, name), got)
    got = adapter.linear_token_mask(decoder, same, "layer.1.EncDecAttention.q")
    assert torch.equal(got, same["labels"] != -100)


def test_batch_without_decoder_inputs_is_a_user_error() -> None:
    model = make()
    data = batch()
    del data["labels"]
    with pytest.raises(EpmqError, match="labels"):
        T5Adapter().run_model(model, data)


def test_encoder_only_model_has_one_stage() -> None:
    torch.manual_seed(0)
    model = T5EncoderModel(config()).eval()
    adapter = adapter_for(model)
    (stage,) = adapter.stages(model)
    data = batch()
    args, kwargs = capture(model, adapter, stage, data)
    hidden = model.encoder.final_layer_norm(run_blocks(model, adapter, stage, args, kwargs))
    want = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    torch.testing.assert_close(hidden, want.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_save_and_load(tmp_path) -> None:
    model = make(seed=4)
    model.save_pretrained(tmp_path)
    loaded = T5Adapter.load(tmp_path)
    assert type(loaded) is T5ForConditionalGeneration and not loaded.training
    want = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(EpmqError, match=r"config\.json.*bert"):
        T5Adapter.load(tmp_path)


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def by_hand(model: nn.Module, tok: Any, text: str, word: str) -> float:
    ids = torch.tensor([tok(text)["input_ids"]])
    labels = torch.tensor([tok(word)["input_ids"]])
    start = torch.zeros(1, 1, dtype=torch.long)  # T5 starts decoding from its pad token (0)
    decoder_ids = torch.cat([start, labels[:, :-1]], dim=1)
    logits = model(input_ids=ids, decoder_input_ids=decoder_ids).logits[0]
    return float(sum(logits.log_softmax(-1)[t, labels[0, t]] for t in range(labels.shape[1])))


@pytest.mark.parametrize("eos", [True, False])
def test_label_word_scores_match_hand_computed(eos: bool) -> None:
    model = make(seed=5)
    tok = tokenizer(eos)
    inputs = ["the film is great", "bad movie", "the movie is very very bad"]
    words = ["yes", "no", "maybe"]
    scores = label_word_log_likelihoods(model, tok, inputs, words, batch_size=2)
    want = torch.tensor([[by_hand(model, tok, x, w) for w in words] for x in inputs])
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(score_label_words(model, tok, inputs, words), want.argmax(dim=1))


def test_a_label_beats_its_own_extension() -> None:
    # log p(a b) = log p(a) + log p(b | a) < log p(a): "great" must win over "great film"
    model = make(seed=6)
    tok = tokenizer(eos=False)
    preds = score_label_words(model, tok, ["the film", "is bad"], ["great film", "great"])
    assert preds.tolist() == [1, 1]


# -- engine level -----------------------------------------------------------------------------
@torch.no_grad()
def logits(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    return [model(**decoder_inputs(model, b), use_cache=False).logits for b in batches]


def test_engine_quantizes_both_stages() -> None:
    from epmq.calib import EngineOptions, quantize_model
    from epmq.quant import QuantGrid

    base = make(seed=8)
    experts = make_experts(base, ".block.")
    merged_state = {k: (experts[0][k] + experts[1][k]) / 2 for k in experts[0]}
    calib = {
        "low": [batch(seed=s, low=2, high=50) for s in (10, 11)],
        "high": [batch(seed=s, low=50, high=100) for s in (12, 13)],
    }
    merged = with_state(base, merged_state)
    done = {}
    for method, alpha in (("gptq", 0.0), ("epmq", 0.05)):
        model = with_state(base, merged_state)
        run = quantize_model(
            model,
            T5Adapter(),
            calib,
            method=method,
            grid=QuantGrid(8),
            experts=experts,
            **params_for(method, alpha=alpha),
            engine=EngineOptions(progress=False),
        )
        assert len(run.layers) == 2 * 7 + 2 * 11  # gated FF: wi_0, wi_1, wo
        assert {r.stage for r in run.layers} == {"encoder", "decoder"}
        done[(method, alpha)] = model
    for batches in calib.values():
        pairs = zip(logits(done[("gptq", 0.0)], batches), logits(merged, batches), strict=True)
        assert max(float((a - b).abs().max()) for a, b in pairs) < 0.05
    for i, batches in enumerate(calib.values()):
        expert = with_state(base, experts[i])
        errors = {}
        for key in (("gptq", 0.0), ("epmq", 0.05)):
            pairs = zip(logits(done[key], batches), logits(expert, batches), strict=True)
            errors[key[0]] = sum(float(((a - b) ** 2).sum()) for a, b in pairs)
        assert errors["epmq"] < 0.8 * errors["gptq"]


def test_registry_detects_and_loads_t5(tmp_path) -> None:
    from epmq.models.registry import adapter_for_folder, detect_family, load_model

    make().save_pretrained(tmp_path)
    assert detect_family(tmp_path) == "t5"
    assert isinstance(adapter_for_folder(tmp_path), T5Adapter)
    model, adapter = load_model(tmp_path)
    assert type(model) is T5ForConditionalGeneration and isinstance(adapter, T5Adapter)


def test_expert_stream_links_decoder_to_normed_encoder_output() -> None:
    # Experts equal to the merged model: with correctly linked expert activations the cross
    # terms equal the Grams, so E-PMQ's continuous target W* is W_m and nothing moves. A
    # decoder fed the un-normed encoder output would move the cross-attention k/v weights.
    from epmq.calib import EngineOptions, quantize_model

    base = make(seed=8)
    state = base.state_dict()
    calib = {"low": [batch(seed=10, low=2, high=50)], "high": [batch(seed=12, low=50, high=100)]}
    model = with_state(base, state)
    quantize_model(
        model,
        T5Adapter(),
        calib,
        method="epmq",
        grid=None,
        experts=[state, state],
        alpha=1e-3,
        x_source="expert",
        engine=EngineOptions(progress=False),
    )
    after = model.state_dict()
    assert max(float((after[k] - state[k]).abs().max()) for k in state) < 1e-2
