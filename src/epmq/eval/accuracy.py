"""Test-split accuracy of an encoder with per-task heads.

The encoder (merged, quantized, an expert or the base) is shared; each task brings its own
linear head on mean-pooled features. Inference runs under ``torch.inference_mode`` on
length-sorted, dynamically padded batches, so short-input tasks cost little.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epmq.errors import EpmqError
from epmq.suites.batching import encode, length_sorted_batches
from epmq.suites.classifier import load_tokenizer, pooled_features
from epmq.suites.task import Task

_TOKENIZERS: dict[str, Any] = {}


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
    if batch_size < 1:
        raise EpmqError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode(tokenizer, texts, max_length=max_length, truncation_side=truncation_side)  # type: ignore[arg-type]
    predictions = torch.empty(len(texts), dtype=torch.long)
    head_device = next(head.parameters()).device
    for index, batch in length_sorted_batches(encoded, batch_size, tokenizer.pad_token_id):
        features = pooled_features(encoder, batch).to(head_device)
        head_dtype = next(head.parameters()).dtype
        predictions[index] = head(features.to(head_dtype)).argmax(-1).cpu()
    return predictions


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
            texts = task.test.texts[:max_examples]
            labels = torch.as_tensor(task.test.labels[:max_examples], dtype=torch.long)
            if not texts:
                raise EpmqError(f"task {task.name}: empty test split")
            head = heads[task.name]
            head_training = head.training
            head.eval()
            predicted = predict(
                encoder,
                head,
                texts,
                tokenizer,
                max_length=task.max_length,
                truncation_side=task.truncation_side,
                batch_size=batch_size,
            )
            head.train(head_training)
            results[task.name] = int((predicted == labels).sum()) / len(texts)
    finally:
        encoder.train(was_training)
    return results
