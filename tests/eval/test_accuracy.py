"""evaluate_accuracy on a tiny BERT: equals accuracies computed by hand, one example at a time."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from epmq.errors import EpmqError
from epmq.eval.accuracy import evaluate_accuracy, evaluation_precision, predict
from epmq.suites.task import Split, Task
from epmq.suites.tiny import build_tiny_base

TEXTS = (
    "the cat is good", "a dog", "bread and cheese on my plum pie today", "hammer", "saw saw",
    "very old red fox near the blue soup", "great", "the", "rake with file and pliers again",
    "happy owl seen there", "egg", "the small new cow was broken",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    from epmq.suites.classifier import load_encoder, load_tokenizer

    folder = build_tiny_base(tmp_path_factory.mktemp("tiny") / "base", hidden=32, layers=2, seed=0)
    return load_encoder(folder), load_tokenizer(folder), folder


def _task(labels: tuple[int, ...], name: str = "t", max_length: int = 16) -> Task:
    empty = Split((), ())
    test = Split(TEXTS, labels)
    return Task(name, ("a", "b", "c"), empty, empty, test, max_length=max_length)


def _head(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(32, 3)


def _by_hand(encoder: Any, tokenizer: Any, head: nn.Linear, task: Task) -> float:
    """One unpadded example at a time, plain mean over its tokens."""
    correct = 0
    with torch.no_grad():
        for text, label in zip(*task.test, strict=True):
            ids = tokenizer(text, truncation=True, max_length=task.max_length)["input_ids"]
            hidden = encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
            correct += int(head(hidden.mean(0)).argmax()) == label
    return correct / len(task.test.texts)


def test_matches_hand_computed_accuracy(model: tuple[Any, Any, Path]) -> None:
    encoder, tokenizer, _ = model
    labels = tuple(i % 3 for i in range(len(TEXTS)))
    tasks = [_task(labels, "one"), _task(tuple(reversed(labels)), "two", max_length=5)]
    heads = {"one": _head(0), "two": _head(1)}
    got = evaluate_accuracy(encoder, heads, tasks, tokenizer=tokenizer, batch_size=5)
    assert set(got) == {"one", "two"}
    for task in tasks:
        assert got[task.name] == pytest.approx(_by_hand(encoder, tokenizer, heads[task.name], task))


def test_constant_head_gives_class_frequency(model: tuple[Any, Any, Path]) -> None:
    encoder, tokenizer, _ = model
    labels = (1, 1, 0, 2, 1, 0, 0, 2, 1, 1, 0, 2)
    head = nn.Linear(32, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    task = _task(labels)
    assert evaluate_accuracy(encoder, {"t": head}, [task], tokenizer=tokenizer) == {"t": 5 / 12}
    first = evaluate_accuracy(encoder, {"t": head}, [task], tokenizer=tokenizer, max_examples=4)
    assert first == {"t": 0.5}  # labels 1, 1, 0, 2


def test_batching_does_not_change_predictions(model: tuple[Any, Any, Path]) -> None:
    encoder, tokenizer, _ = model
    head = _head(2)
    one = predict(encoder, head, TEXTS, tokenizer, batch_size=1)
    many = predict(encoder, head, TEXTS, tokenizer, batch_size=7)
    assert torch.equal(one, many)
    assert one.shape == (len(TEXTS),)


def test_tokenizer_found_beside_the_weights(model: tuple[Any, Any, Path]) -> None:
    encoder, tokenizer, _ = model
    task = _task(tuple(i % 3 for i in range(len(TEXTS))))
    heads = {"t": _head(3)}
    assert evaluate_accuracy(encoder, heads, [task]) == evaluate_accuracy(
        encoder, heads, [task], tokenizer=tokenizer
    )
    from transformers import BertConfig, BertModel

    orphan = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(EpmqError, match="tokenizer"):
        evaluate_accuracy(orphan, heads, [task])


def test_user_errors_and_modes(model: tuple[Any, Any, Path]) -> None:
    encoder, tokenizer, _ = model
    task = _task(tuple(i % 3 for i in range(len(TEXTS))))
    with pytest.raises(EpmqError, match=r"no head for task\(s\) \['t'\]"):
        evaluate_accuracy(encoder, {"other": _head(0)}, [task], tokenizer=tokenizer)
    with pytest.raises(EpmqError, match="max_examples"):
        evaluate_accuracy(encoder, {"t": _head(0)}, [task], tokenizer=tokenizer, max_examples=0)
    encoder.train()
    evaluate_accuracy(encoder, {"t": _head(0)}, [task], tokenizer=tokenizer)
    assert encoder.training  # mode restored
    encoder.eval()


@pytest.mark.parametrize(
    ("dtype", "expected"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
)
def test_evaluation_precision_sets_the_linears_dtype(
    model: tuple[Any, Any, Path], dtype: str, expected: torch.dtype
) -> None:
    encoder, tokenizer, _ = model
    seen: list[torch.dtype] = []
    linear = encoder.encoder.layer[0].intermediate.dense
    handle = linear.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    task = _task(tuple(i % 3 for i in range(len(TEXTS))))
    try:
        with evaluation_precision(dtype):
            got = evaluate_accuracy(encoder, {"t": _head(4)}, [task], tokenizer=tokenizer)
    finally:
        handle.remove()
    assert seen and set(seen) == {expected}
    assert 0.0 <= got["t"] <= 1.0
    assert all(p.dtype == torch.float32 for p in encoder.parameters())  # weights untouched
    with torch.no_grad():  # and autocast is off again afterwards
        assert linear(torch.zeros(1, linear.in_features)).dtype == torch.float32


def test_unknown_evaluation_precision_is_a_user_error() -> None:
    with pytest.raises(EpmqError, match="float16"), evaluation_precision("float16"):
        pass
