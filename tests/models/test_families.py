"""One description per model family: the adapter class's declarations drive every lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from epmq.errors import EpmqError
from epmq.experiment.config import parse_config
from epmq.heads import FamilyTasks, HeadOptions, family_tasks, tasks_class
from epmq.models import BlockAdapter, families, register_adapter, registered_adapters
from epmq.models.bert import BertAdapter
from epmq.models.registry import model_types


def test_every_family_declares_a_loader_and_task_heads() -> None:
    found = families()
    assert set(found) == {"bert", "distilbert", "clip", "t5", "llama", "vit"}
    for name, adapter in found.items():
        assert adapter.family == name and adapter.model_types
        assert adapter.load is not BlockAdapter.load, name
        cls = tasks_class(adapter)
        assert issubclass(cls, FamilyTasks) and cls is not FamilyTasks


def test_model_types_map_to_the_declaring_family() -> None:
    types = model_types()
    for adapter in families().values():
        assert all(types[t] == adapter.family for t in adapter.model_types)
    assert types["xlm-roberta"] == types["electra"] == "bert"
    assert types["distilbert"] == "distilbert" and "gpt2" not in types


class _Clone(BlockAdapter):
    family = "bert"
    model_types = ("not-a-bert",)


class _Thief(BlockAdapter):
    family = "thief"
    model_types = ("gpt2", "roberta")


def test_a_family_or_model_type_is_declared_once() -> None:
    families()
    before = registered_adapters()
    with pytest.raises(ValueError, match="family 'bert' is declared by BertAdapter"):
        register_adapter(_Clone)
    with pytest.raises(ValueError, match=r"\['roberta'\] of _Thief belong to BertAdapter"):
        register_adapter(_Thief)
    assert registered_adapters() == before


class _NoHeads(BlockAdapter):
    family = "noheads"
    model_types = ("noheads",)


class _BadHeads(BlockAdapter):
    family = "badheads"
    model_types = ("badheads",)
    tasks = "epmq.heads.base:chunks"


def test_task_heads_declaration_is_checked() -> None:
    with pytest.raises(EpmqError, match="'noheads' has no task heads"):
        tasks_class(_NoHeads)
    with pytest.raises(TypeError, match=r"_BadHeads\.tasks = 'epmq\.heads\.base:chunks'"):
        tasks_class(_BadHeads)


def test_family_tasks_take_family_and_loader_from_the_adapter(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    BertModel(
        BertConfig(
            vocab_size=8,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        )
    ).save_pretrained(tmp_path)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]").save_pretrained(tmp_path)
    logic = family_tasks("bert", tmp_path, HeadOptions(pooling="cls"))
    assert logic.family == "bert" and logic.adapter is BertAdapter and logic.pooling == "cls"
    model = logic.load_model(tmp_path)
    assert isinstance(model, nn.Module) and model.pooler is None
    with pytest.raises(EpmqError, match="unknown model family 'gpt'; choose one of bert"):
        family_tasks("gpt", tmp_path, HeadOptions())


def test_config_family_is_checked_against_the_families() -> None:
    assert parse_config({"suite": "s", "family": "t5"}).family == "t5"
    with pytest.raises(EpmqError, match=r"family: unknown model family 'gpt'; choose one of"):
        parse_config({"suite": "s", "family": "gpt"})
