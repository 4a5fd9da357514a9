"""The DistilBERT adapter (and ELECTRA in the BERT family): detection, stages, linear groups,
norm sites, capture/propagation, loading task-model checkpoints, quantization."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraModel,
)

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.capture import capture_stage_inputs
from epmq.calib.propagate import propagate_calls
from epmq.models import adapter_for
from epmq.models.bert import BertAdapter
from epmq.models.distilbert import DistilBertAdapter
from epmq.models.registry import detect_family, load_model
from epmq.quant import QuantGrid

SMALL = dict(
    vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=40
)


def tiny(cls=DistilBertModel, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return cls(DistilBertConfig(**SMALL, **extra)).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("model", "path"),
    [
        (tiny(), "transformer.layer"),
        (tiny(DistilBertForSequenceClassification, num_labels=3), "distilbert.transformer.layer"),
    ],
)
def test_adapter_is_found_with_stage(model, path: str) -> None:
    adapter = adapter_for(model)
    assert isinstance(adapter, DistilBertAdapter)
    (stage,) = adapter.stages(model)
    assert stage.blocks_path == path
    assert len(adapter.blocks(model, stage)) == 2


def test_linear_groups_and_norm_sites() -> None:
    block = tiny().transformer.layer[0]
    adapter = DistilBertAdapter()
    assert adapter.linear_groups(block) == [
        ["attention.q_lin", "attention.k_lin", "attention.v_lin"],
        ["attention.out_lin"],
        ["ffn.lin1"],
        ["ffn.lin2"],
    ]
    assert adapter.norms(block) == [
        ("sa_layer_norm", "attention.out_lin"),
        ("output_layer_norm", "ffn.lin2"),
    ]
    # every input producer is a module of the block that outputs its reader's input width
    modules = dict(block.named_modules())
    for reader, producer in adapter.input_producers.items():
        assert modules[producer].out_features == modules[reader].in_features


@torch.no_grad()
def test_captured_inputs_replay_to_the_model_output() -> None:
    model = tiny()
    adapter = DistilBertAdapter()
    (stage,) = adapter.stages(model)
    calls = capture_stage_inputs(model, adapter, stage, [batch(0), batch(1)], "t")
    assert calls[0].mask is not None and calls[0].mask.dtype == torch.bool
    for index, block in enumerate(adapter.blocks(model, stage)):
        calls = propagate_calls(adapter, stage, index, block, calls)
    for call, b in zip(calls, [batch(0), batch(1)], strict=True):
        want = model(**b).last_hidden_state
        torch.testing.assert_close(adapter.hidden_states(call.args, call.kwargs), want)


ELECTRA = dict(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2)
ELECTRA_REST = dict(num_attention_heads=2, intermediate_size=64)  # embeddings_project is used
CHECKPOINTS = [
    (DistilBertForSequenceClassification, DistilBertConfig(**SMALL), "distilbert", DistilBertModel),
    (
        ElectraForSequenceClassification,
        ElectraConfig(**ELECTRA, **ELECTRA_REST),
        "bert",
        ElectraModel,
    ),
]


@pytest.mark.parametrize(("task_cls", "config", "family", "kind"), CHECKPOINTS)
@torch.no_grad()
def test_task_checkpoint_loads_its_backbone_quietly(
    task_cls, config, family: str, kind, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``*ForSequenceClassification`` folder loads as its backbone (prefix stripped, the
    classifier left out without a warning); the family's loader takes the encoder heads'
    ``add_pooling_layer`` (these models have no pooler) and the blocks replay."""
    torch.manual_seed(0)
    config.num_labels = 2
    task_model = task_cls(config).eval()
    task_model.save_pretrained(tmp_path)
    assert detect_family(tmp_path) == family
    with caplog.at_level(logging.WARNING, logger="epmq"):
        model, adapter = load_model(tmp_path, add_pooling_layer=False)
    assert caplog.records == []
    assert type(model) is kind
    assert isinstance(adapter, DistilBertAdapter if family == "distilbert" else BertAdapter)
    want = task_model.base_model(**batch(0)).last_hidden_state
    torch.testing.assert_close(model(**batch(0)).last_hidden_state, want)
    (stage,) = adapter.stages(model)
    calls = capture_stage_inputs(model, adapter, stage, [batch(0)], "t")
    for index, block in enumerate(adapter.blocks(model, stage)):
        calls = propagate_calls(adapter, stage, index, block, calls)
    torch.testing.assert_close(adapter.hidden_states(calls[0].args, calls[0].kwargs), want)


@pytest.mark.parametrize("method", ["gptq", "epmq", "awq"])
def test_quantized_with_experts(method: str, tmp_path: Path) -> None:
    """Every linear of every block is solved, with experts saved as task models."""
    merged = tiny(seed=0)
    folders = []
    for i in range(2):
        expert = tiny(DistilBertForSequenceClassification, seed=10 + i, num_labels=2)
        expert.save_pretrained(tmp_path / f"e{i}")
        folders.append(tmp_path / f"e{i}")
    before = merged(**batch(2)).last_hidden_state
    run = quantize_model(
        merged,
        None,
        {"a": [batch(0)], "b": [batch(1)]},
        method=method,
        grid=QuantGrid(4),
        experts=folders,
        engine=EngineOptions(progress=False),
    )
    names = {r.name for r in run.layers}
    assert "transformer.layer.1.ffn.lin2" in names and len(names) == 12
    after = merged(**batch(2)).last_hidden_state
    assert torch.isfinite(after).all() and not torch.equal(before, after)
