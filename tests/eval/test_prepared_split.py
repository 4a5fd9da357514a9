"""Test splits are tokenized once and reused: same batches, same accuracy as fresh encoding."""

from typing import Any

import pytest
import torch
from torch import nn

from epmq.eval import accuracy
from epmq.eval.accuracy import evaluate_accuracy, predict, prepared_split
from epmq.suites.task import Split, Task
from epmq.suites.tiny import build_tiny_base

TEXTS = ("the cat is good", "a dog", "bread and cheese on my plum pie", "hammer", "saw saw")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from epmq.suites.classifier import load_encoder, load_tokenizer

    folder = build_tiny_base(tmp_path_factory.mktemp("tiny") / "base", hidden=32, layers=2, seed=0)
    return load_encoder(folder), load_tokenizer(folder)


def _task(name: str = "t", max_length: int = 16) -> Task:
    empty = Split((), ())
    return Task(name, ("a", "b"), empty, empty, Split(TEXTS, (0, 1, 0, 1, 1)), max_length)


def test_split_is_tokenized_once(model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _, tokenizer = model
    calls = []
    real = accuracy.encode
    monkeypatch.setattr(accuracy, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = _task("once")
    first = prepared_split(task, tokenizer, 2)
    assert prepared_split(task, tokenizer, 2) is first
    assert len(calls) == 1
    assert prepared_split(task, tokenizer, 3) is not first  # another batch size: new batches
    assert prepared_split(_task("once", max_length=3), tokenizer, 2) is not first
    assert len(prepared_split(task, tokenizer, 2, max_examples=2).labels) == 2


def test_cached_evaluation_equals_fresh_predictions(model: tuple[Any, Any]) -> None:
    encoder, tokenizer = model
    torch.manual_seed(0)
    head = nn.Linear(32, 2)
    task = _task("same")
    fresh = predict(encoder, head, TEXTS, tokenizer, max_length=16, batch_size=2)
    expected = (fresh == torch.tensor(task.test.labels)).float().mean().item()
    for _ in range(2):  # the second call evaluates from the cached batches
        got = evaluate_accuracy(encoder, {"same": head}, [task], tokenizer=tokenizer, batch_size=2)
        assert got["same"] == pytest.approx(expected)
