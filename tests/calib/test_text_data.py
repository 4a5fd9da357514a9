"""Calibration text: reading .txt/.jsonl/.csv, seeded sampling, tokenized padded batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from epmq.calib.text_data import (
    calibration_batches,
    load_calibration,
    model_input_names,
    parse_task_paths,
    read_texts,
    sample_texts,
)
from epmq.errors import EpmqError

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "far", "away", "today"]


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    return BertTokenizerFast(vocab_file=str(vocab))


def test_read_txt_jsonl_csv(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n")
    assert read_texts(tmp_path / "a.txt") == ["first line", "second line"]
    rows = [{"text": "one", "body": "x"}, {"text": "two", "body": "y"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "a.jsonl", field="body") == ["x", "y"]
    (tmp_path / "a.csv").write_text('id,text\n1,"hello, world"\n2,"multi\nline"\n3,\n')
    assert read_texts(tmp_path / "a.csv") == ["hello, world", "multi\nline"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.parquet", "x", "unknown type '.parquet'"),
        ("a.txt", "\n \n", "holds no examples"),
        ("a.jsonl", '{"text": "ok"}\n{"body": "no"}\n', "a.jsonl:2: no field 'text'"),
        ("a.jsonl", '{"text": "ok"}\nnot json\n', "a.jsonl:2: not valid JSON"),
        ("a.jsonl", '{"text": 3}\n', "a.jsonl:1: field 'text' is not a string"),
        ("a.csv", "id,body\n1,x\n", "no column 'text' (columns: id, body)"),
    ],
)
def test_read_errors_name_file_and_place(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(EpmqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_texts(tmp_path / name)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EpmqError, match="does not exist"):
        read_texts(tmp_path / "none.txt")


def test_sample_is_seeded_in_file_order_and_capped() -> None:
    texts = [f"t{i}" for i in range(50)]
    a, b = sample_texts(texts, 10, "0:x"), sample_texts(texts, 10, "0:x")
    assert a == b and len(set(a)) == 10
    assert a == sorted(a, key=texts.index)
    assert sample_texts(texts, 10, "1:x") != a
    assert sample_texts(texts, 80, 0) == texts
    with pytest.raises(EpmqError, match="calibration size must be >= 1"):
        sample_texts(texts, 0, 0)


def test_batches_sorted_padded_truncated(bert_tokenizer: BertTokenizerFast) -> None:
    texts = ["the cat", "the dog sat on a mat and ran far away today", "cat", "a mat sat"]
    batches = calibration_batches(bert_tokenizer, texts, batch_size=3, max_length=8)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    first = batches[0]
    assert first["input_ids"].shape[1] == 8  # the long text is cut to max_length
    assert first["attention_mask"].sum(1).tolist() == [8, 5, 4]  # longest first
    pad = bert_tokenizer.pad_token_id
    assert bool((first["input_ids"][first["attention_mask"] == 0] == pad).all())
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids"}
    kept = calibration_batches(
        bert_tokenizer,
        texts,
        batch_size=4,
        max_length=8,
        input_names=["input_ids", "attention_mask"],
    )
    assert set(kept[0]) == {"input_ids", "attention_mask"}
    with pytest.raises(EpmqError, match="batch size must be >= 1"):
        calibration_batches(bert_tokenizer, texts, batch_size=0, max_length=8)


def test_tokenizer_without_pad_pads_with_eos() -> None:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    assert tok.pad_token is None
    (batch,) = calibration_batches(tok, ["the cat sat", "dog"], batch_size=2, max_length=16)
    assert batch["input_ids"].tolist()[1] == [tok.convert_tokens_to_ids("dog"), 1, 1]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_model_input_names_drop_what_forward_does_not_take() -> None:
    bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8, vocab_size=20))  # fmt: skip
    assert {"input_ids", "attention_mask", "token_type_ids"} <= set(model_input_names(bert) or [])
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=20))  # fmt: skip
    names = model_input_names(llama) or []
    assert "input_ids" in names and "token_type_ids" not in names


def test_load_calibration_per_task(tmp_path: Path, bert_tokenizer: BertTokenizerFast) -> None:
    (tmp_path / "a.txt").write_text("\n".join(" ".join(WORDS[i:]) for i in range(10)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "the cat"}))
    calib, info = load_calibration(
        bert_tokenizer, {"a": tmp_path / "a.txt", "b": tmp_path / "b.jsonl"},
        size=4, max_length=16, batch_size=3, seed=0,
    )  # fmt: skip
    assert [len(calib["a"]), len(calib["b"])] == [2, 1]
    assert sum(b["input_ids"].shape[0] for b in calib["a"]) == 4
    assert info["a"]["examples"] == 10 and info["a"]["used"] == 4 and info["b"]["used"] == 1
    again, _ = load_calibration(
        bert_tokenizer, {"a": tmp_path / "a.txt"}, size=4, max_length=16, batch_size=3, seed=0
    )
    pairs = zip(calib["a"], again["a"], strict=True)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in pairs)


def test_parse_task_paths() -> None:
    assert parse_task_paths(["a=x.txt", " b = y.csv "], "--calib") == {
        "a": Path("x.txt"),
        "b": Path("y.csv"),
    }
    for bad in (["a"], ["=x"], ["a="]):
        with pytest.raises(EpmqError, match="expected TASK=PATH"):
            parse_task_paths(bad, "--calib")
    with pytest.raises(EpmqError, match="task 'a' is given twice"):
        parse_task_paths(["a=x", "a=y"], "--calib")
