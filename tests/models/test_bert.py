"""The BERT-style adapter: detection, stages, linear groups, capture/propagation, loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CamembertConfig,
    CamembertModel,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.capture import capture_stage_inputs
from epmq.calib.propagate import propagate_calls
from epmq.errors import EpmqError
from epmq.models import adapter_for
from epmq.models.bert import BertAdapter, load_bert
from epmq.models.registry import detect_family, load_model
from epmq.quant import QuantGrid

SMALL = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=40,
)


def tiny_bert(cls=BertModel, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return cls(BertConfig(**SMALL, **extra)).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("model", "path"),
    [
        (tiny_bert(), "encoder.layer"),
        (tiny_bert(BertForSequenceClassification, num_labels=3), "bert.encoder.layer"),
        (RobertaModel(RobertaConfig(**SMALL, pad_token_id=1)), "encoder.layer"),
    ],
)
def test_adapter_is_found_with_stage(model, path: str) -> None:
    adapter = adapter_for(model)
    assert isinstance(adapter, BertAdapter)
    (stage,) = adapter.stages(model)
    assert stage.blocks_path == path
    assert len(adapter.blocks(model, stage)) == 2


def test_linear_groups_are_true_sequential() -> None:
    model = tiny_bert()
    groups = BertAdapter().linear_groups(model.encoder.layer[0])
    assert groups == [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ]


def test_unknown_model_is_refused() -> None:
    with pytest.raises(EpmqError, match="no adapter for model Linear"):
        adapter_for(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_captured_inputs_replay_to_the_model_output() -> None:
    model = tiny_bert()
    adapter = BertAdapter()
    (stage,) = adapter.stages(model)
    calls = capture_stage_inputs(model, adapter, stage, [batch(0), batch(1)], "t")
    assert calls[0].mask is not None and calls[0].mask.dtype == torch.bool
    for index, block in enumerate(adapter.blocks(model, stage)):
        calls = propagate_calls(adapter, stage, index, block, calls)
    for call, b in zip(calls, [batch(0), batch(1)], strict=True):
        want = model(**b).last_hidden_state
        torch.testing.assert_close(adapter.hidden_states(call.args, call.kwargs), want)


@pytest.mark.parametrize(
    ("config", "cls"), [(XLMRobertaConfig, XLMRobertaModel), (CamembertConfig, CamembertModel)]
)
@torch.no_grad()
def test_roberta_variants_are_bert_family_end_to_end(config, cls, tmp_path) -> None:
    """XLM-R and CamemBERT share RoBERTa's ``encoder.layer.N`` layout: detected, loaded and
    replayed block by block like BERT."""
    torch.manual_seed(0)
    cls(config(**SMALL, pad_token_id=1)).eval().save_pretrained(tmp_path)
    assert detect_family(tmp_path) == "bert"
    model, adapter = load_model(tmp_path, add_pooling_layer=False)
    assert type(model) is cls and isinstance(adapter, BertAdapter) and model.pooler is None
    (stage,) = adapter.stages(model)
    assert stage.blocks_path == "encoder.layer"
    calls = capture_stage_inputs(model, adapter, stage, [batch(0)], "t")
    for index, block in enumerate(adapter.blocks(model, stage)):
        assert adapter.linear_groups(block)[0] == [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
        ]
        calls = propagate_calls(adapter, stage, index, block, calls)
    want = model(**batch(0)).last_hidden_state
    torch.testing.assert_close(adapter.hidden_states(calls[0].args, calls[0].kwargs), want)


def test_load_bert_from_folder(tmp_path) -> None:
    tiny_bert(BertForSequenceClassification, num_labels=2).save_pretrained(tmp_path / "m")
    model = load_bert(tmp_path / "m", "sequence-classification")
    assert isinstance(model, BertForSequenceClassification) and not model.training
    with pytest.raises(EpmqError, match="unknown BERT head"):
        load_bert(tmp_path / "m", "vision")
    with pytest.raises(EpmqError, match=r"no config\.json"):
        load_bert(tmp_path / "missing")


def test_classifier_quantized_with_experts_saved_as_bare_encoders(tmp_path) -> None:
    """Merged model is BertFor...; experts were saved as BertModel (no ``bert.`` prefix)."""
    merged = tiny_bert(BertForSequenceClassification, num_labels=2)
    folders = []
    for i in range(2):
        expert = tiny_bert(seed=10 + i)
        state = {k: v.contiguous() for k, v in expert.state_dict().items()}
        (tmp_path / f"e{i}").mkdir()
        save_file(state, str(tmp_path / f"e{i}" / "model.safetensors"))
        folders.append(tmp_path / f"e{i}")
    calib = {"a": [batch(0)], "b": [batch(1)]}
    run = quantize_model(
        merged,
        None,
        calib,
        method="epmq",
        grid=QuantGrid(4),
        experts=folders,
        engine=EngineOptions(progress=False),
    )
    names = {r.name for r in run.layers}
    assert "bert.encoder.layer.1.output.dense" in names and len(names) == 12
    logits = merged(**batch(2)).logits
    assert torch.isfinite(logits).all()
