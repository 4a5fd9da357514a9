"""Test-split accuracy of an encoder with per-task heads.

The encoder (merged, quantized, an expert or the base) is shared; each task brings its own
linear head on mean-pooled features. Inference runs under ``torch.inference_mode`` on
length-sorted, dynamically padded batches, so short-input tasks cost little. Each test split is
tokenized and batched once (:func:`prepared_split` keeps the padded batches of the latest
splits), so an experiment that evaluates dozens of models on the same tasks tokenizes once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epmq.errors import EpmqError
from epmq.suites.batching import Batch, encode, length_sorted_batches
from epmq.suites.classifier import load_tokenizer, pooled_features
from epmq.suites.task import Task

_TOKENIZERS: dict[str, Any] = {}
_BATCH_CACHE_SIZE = 64  # test splits whose padded batches are kept (8 tasks x a few settings)


@dataclass(frozen=True)
class PreparedSplit:
    """A test split tokenized and cut into length-sorted padded batches, with its labels."""

    batches: list[tuple[list[int], Batch]]
    labels: torch.Tensor


_BATCHES: dict[tuple[Any, ...], tuple[Any, PreparedSplit]] = {}


def tokenizer_for(encoder: nn.Module) -> Any:
    """The tokenizer saved beside the encoder's weights (its ``config.name_or_path``)."""
    config = getattr(encoder, "config", None)
    source = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    if not source or not Path(source).is_dir():
        raise EpmqError(
            "cannot find a tokenizer for this encoder (config.name_or_path is not a folder); "
            "pass tokenizer=..."
        )
    if source not in _TOKENIZERS:
        _TOKENIZERS[source] = load_tokenizer(source)
    return _TOKENIZERS[source]


@torch.inference_mode()
def predict(
    encoder: nn.Module,
    head: nn.Module,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int = 64,
    truncation_side: str = "right",
    batch_size: int = 128,
) -> torch.Tensor:
    """Predicted class index of each text (in input order)."""
    _check_batch_size(batch_size)
    encoded = encode(tokenizer, texts, max_length=max_length, truncation_side=truncation_side)  # type: ignore[arg-type]
    batches = length_sorted_batches(encoded, batch_size, tokenizer.pad_token_id)
    return predict_batches(encoder, head, batches, len(texts))


@torch.inference_mode()
def predict_batches(
    encoder: nn.Module, head: nn.Module, batches: Sequence[tuple[list[int], Batch]], n: int
) -> torch.Tensor:
    """Predicted class index of each of ``n`` examples given as (indices, padded batch)."""
    predictions = torch.empty(n, dtype=torch.long)
    head_param = next(head.parameters())
    for index, batch in batches:
        features = pooled_features(encoder, batch).to(head_param.device)
        predictions[index] = head(features.to(head_param.dtype)).argmax(-1).cpu()
    return predictions


def prepared_split(
    task: Task, tokenizer: Any, batch_size: int, max_examples: int | None = None
) -> PreparedSplit:
    """The first ``max_examples`` test examples of ``task`` as padded length-sorted batches.

    Tokenized once per (tokenizer, split, length settings, batch size): later calls with the
    same arguments return the same batches (the latest ``_BATCH_CACHE_SIZE`` are kept).
    """
    _check_batch_size(batch_size)
    split = task.test
    key = (id(tokenizer), split, task.max_length, task.truncation_side, batch_size, max_examples)
    hit = _BATCHES.get(key)
    if hit is not None and hit[0] is tokenizer:  # the entry holds the tokenizer: ids stay unique
        return hit[1]
    texts = split.texts[:max_examples]
    if not texts:
        raise EpmqError(f"task {task.name}: empty test split")
    encoded = encode(
        tokenizer, texts, max_length=task.max_length, truncation_side=task.truncation_side
    )
    prepared = PreparedSplit(
        length_sorted_batches(encoded, batch_size, tokenizer.pad_token_id),
        torch.as_tensor(split.labels[:max_examples], dtype=torch.long),
    )
    if len(_BATCHES) >= _BATCH_CACHE_SIZE:
        del _BATCHES[next(iter(_BATCHES))]
    _BATCHES[key] = (tokenizer, prepared)
    return prepared


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise EpmqError(f"batch_size must be >= 1, got {batch_size}")


def evaluate_accuracy(
    encoder: nn.Module,
    heads: Mapping[str, nn.Module],
    tasks: Iterable[Task],
    *,
    tokenizer: Any = None,
    batch_size: int = 128,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Accuracy on each task's test split: ``{task name: fraction correct}``.

    ``heads`` maps task names to heads (every task needs one). ``tokenizer`` defaults to the
    one stored in the encoder's source folder. ``max_examples`` evaluates only the first
    examples of each test split (a fixed prefix, so results stay comparable).
    """
    if max_examples is not None and max_examples < 1:
        raise EpmqError(f"max_examples must be >= 1 or None, got {max_examples}")
    tasks = list(tasks)
    missing = [t.name for t in tasks if t.name not in heads]
    if missing:
        raise EpmqError(f"no head for task(s) {missing}; heads given for {sorted(heads)}")
    if tokenizer is None:
        tokenizer = tokenizer_for(encoder)
    was_training = encoder.training
    encoder.eval()
    results = {}
    try:
        for task in tasks:
            prepared = prepared_split(task, tokenizer, batch_size, max_examples)
            head = heads[task.name]
            head_training = head.training
            head.eval()
            predicted = predict_batches(encoder, head, prepared.batches, len(prepared.labels))
            head.train(head_training)
            results[task.name] = int((predicted == prepared.labels).sum()) / len(prepared.labels)
    finally:
        encoder.train(was_training)
    return results


EVAL_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


@contextlib.contextmanager
def evaluation_precision(dtype: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the enclosed evaluation forwards in ``dtype``.

    ``float32`` changes nothing; ``bfloat16`` enables autocast on ``device`` (matmuls and
    linears in bfloat16 with float32 accumulation, the rest in float32), which several times
    speeds up CPUs with AMX or AVX-512 BF16 at the cost of a few flipped predictions near a
    decision boundary. Weights are never changed: a quantized model's dequantized grid values
    stay float32 in the model.
    """
    if dtype not in EVAL_DTYPES:
        raise EpmqError(f"evaluation dtype must be one of {', '.join(EVAL_DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        yield
        return
    kind = torch.device(device).type
    with torch.autocast(kind, dtype=torch.bfloat16):
        yield
