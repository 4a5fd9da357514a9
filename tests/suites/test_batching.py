"""Tokenization helpers: truncation side, dynamic padding, length-sorted and training batches."""

from pathlib import Path
from typing import Any

import pytest
import torch

from epmq.suites.batching import encode, length_sorted_batches, pad_batch, training_batches
from epmq.suites.classifier import PooledClassifier, mean_pool
from epmq.suites.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(Path(tmp_path_factory.mktemp("tok")))


def test_encode_truncates_either_side(tokenizer: Any) -> None:
    text = "cat dog owl fox cow bee"
    right = encode(tokenizer, [text], max_length=4)[0]
    left = encode(tokenizer, [text], max_length=4, truncation_side="left")[0]
    assert tokenizer.convert_ids_to_tokens(right) == ["[CLS]", "cat", "dog", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(left) == ["[CLS]", "cow", "bee", "[SEP]"]
    assert tokenizer.truncation_side == "right"  # restored


def test_pad_batch() -> None:
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert not batch["token_type_ids"].any()


def test_length_sorted_batches_cover_everything() -> None:
    encoded = [[1] * n for n in (3, 9, 1, 5, 5, 2, 7)]
    batches = length_sorted_batches(encoded, 3, pad_id=0)
    indices = [i for index, _ in batches for i in index]
    assert sorted(indices) == list(range(7))
    assert [b["input_ids"].shape[1] for _, b in batches] == [9, 5, 1]
    for index, batch in batches:
        assert batch["attention_mask"].sum(1).tolist() == [len(encoded[i]) for i in index]


def test_training_batches_are_seeded_and_cover_an_epoch() -> None:
    encoded = [[1] * (1 + i % 6) for i in range(40)]
    labels = list(range(40))

    def epoch(seed: int) -> list[list[int]]:
        stream = training_batches(encoded, labels, 8, pad_id=0, seed=seed, bucket=2)
        return [next(stream)[1].tolist() for _ in range(5)]

    first = epoch(0)
    assert first == epoch(0) and first != epoch(1)
    assert sorted(i for batch in first for i in batch) == labels


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_pooled_classifier_is_padding_invariant(tokenizer: Any) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    model = PooledClassifier(BertModel(config, add_pooling_layer=False), torch.nn.Linear(32, 3))
    model.eval()
    ids = encode(tokenizer, ["cat dog owl", "cat"], max_length=16)
    alone = model(**pad_batch([ids[1]], tokenizer.pad_token_id))
    padded = model(**pad_batch(ids, tokenizer.pad_token_id))[1:]
    assert torch.allclose(alone, padded, atol=1e-5)
