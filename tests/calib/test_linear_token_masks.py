"""Per-linear token masks: T5's decoder cross-attention k/v Grams count real encoder tokens only."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.capture import capture_stage_inputs
from epmq.calib.statistics import LinearInputs
from epmq.models.adapter import BlockAdapter
from epmq.models.t5 import T5Adapter
from epmq.quant import QuantGrid

CROSS = "layer.1.EncDecAttention"


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        d_kv=16,
        vocab_size=100,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def padded_batch(seed: int, enc_len: int, dec_len: int) -> dict[str, torch.Tensor]:
    """Encoder padding in rows 0 and 2, decoder padding (labels -100) in rows 1 and 2."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (3, enc_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, enc_len - 2 :] = 0
    mask[2, enc_len - 1 :] = 0
    labels = torch.randint(2, 100, (3, dec_len), generator=gen)
    labels[1, dec_len - 3 :] = -100
    labels[2, dec_len - 1 :] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def hand_gram(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(rows).double()
    return (x.T @ x / x.shape[0]).float()


@pytest.mark.parametrize(("enc_len", "dec_len"), [(6, 6), (8, 5)])
def test_cross_attention_kv_grams_use_the_encoder_mask(enc_len: int, dec_len: int) -> None:
    model = tiny_t5()
    batches = [padded_batch(1, enc_len, dec_len), padded_batch(2, enc_len, dec_len)]
    run = quantize_model(
        model,
        T5Adapter(),
        {"task": batches},
        method="rtn",
        grid=QuantGrid(4),
        engine=EngineOptions(keep_grams=True, progress=False),
    )
    # The decoder saw the encoder as solved: the same encoder the model holds now.
    with torch.no_grad():
        states = [
            model.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
            for b in batches
        ]
    real = [s[b["attention_mask"].bool()] for s, b in zip(states, batches, strict=True)]
    want = hand_gram(real)
    n_encoder = sum(int(b["attention_mask"].sum()) for b in batches)
    n_decoder = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert n_encoder != n_decoder
    tokens = {r.name: r.tokens["task"] for r in run.layers}
    for block in (0, 1):
        for linear in ("k", "v"):
            name = f"decoder.block.{block}.{CROSS}.{linear}"
            torch.testing.assert_close(run.grams[f"{name}.weight"][0], want, rtol=1e-5, atol=1e-6)
            assert tokens[name] == n_encoder
        assert tokens[f"decoder.block.{block}.{CROSS}.q"] == n_decoder
        assert tokens[f"decoder.block.{block}.layer.0.SelfAttention.q"] == n_decoder
        assert tokens[f"encoder.block.{block}.layer.0.SelfAttention.q"] == n_encoder


def test_capture_records_only_the_linears_whose_mask_differs() -> None:
    model = tiny_t5()
    adapter = T5Adapter()
    encoder, decoder = adapter.stages(model)
    data = padded_batch(3, 6, 6)
    (call,) = capture_stage_inputs(model, adapter, decoder, [data], "task")
    assert torch.equal(call.mask, data["labels"] != -100)
    assert set(call.linear_masks) == {f"{CROSS}.k", f"{CROSS}.v"}
    assert torch.equal(call.mask_for(f"{CROSS}.k"), data["attention_mask"].bool())
    assert torch.equal(call.mask_for(f"{CROSS}.q"), call.mask)
    (enc_call,) = capture_stage_inputs(model, adapter, encoder, [data], "task")
    assert enc_call.linear_masks == {}


def test_default_linear_mask_is_the_stage_mask() -> None:
    data = {"attention_mask": torch.tensor([[1, 1, 0]])}
    adapter = T5Adapter()
    stage = adapter.stages(tiny_t5())[0]
    got = BlockAdapter.linear_token_mask(adapter, stage, data, "layer.0.SelfAttention.q")
    assert torch.equal(got, torch.tensor([[True, True, False]]))


def test_linear_inputs_apply_each_linears_mask() -> None:
    block = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4)})
    x = torch.randn(2, 3, 4)
    default = torch.tensor([[True, True, False], [True, False, False]])
    other = torch.tensor([[True, True, True], [True, True, False]])
    recorder = LinearInputs(block, ["a", "b"], stop=False)
    with recorder:
        recorder.reset(default, {"b": other})
        block["a"](x)
        block["b"](x)
    assert torch.equal(recorder.inputs["a"], x[default])
    assert torch.equal(recorder.inputs["b"], x[other])
