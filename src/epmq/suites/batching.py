"""Tokenization and batching for the suites' text encoders.

Texts are tokenized once without padding; batches are padded only to their own longest
member (dynamic padding). For inference, examples are sorted by length first so each batch
holds similar lengths and almost no padding; for training, a seeded shuffle is sorted within
buckets of a few batches, which keeps batches random but short.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

Encoded = list[list[int]]
Batch = dict[str, torch.Tensor]


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    truncation_side: Literal["left", "right"] = "right",
) -> Encoded:
    """Token ids (with special tokens) of each text, cut to ``max_length``.

    ``truncation_side="left"`` keeps the end of long texts.
    """
    previous = tokenizer.truncation_side
    tokenizer.truncation_side = truncation_side
    try:
        out = tokenizer(
            list(texts),
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
    finally:
        tokenizer.truncation_side = previous
    return [list(ids) for ids in out["input_ids"]]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Right-pad token id lists to the longest one: ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (all zeros: single-segment inputs)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def length_sorted_batches(
    encoded: Encoded, batch_size: int, pad_id: int
) -> list[tuple[list[int], Batch]]:
    """Deterministic inference batches: (original indices, padded batch), longest first."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batches.append((index, pad_batch([encoded[i] for i in index], pad_id)))
    return batches


def training_batches(
    encoded: Encoded,
    labels: Sequence[int],
    batch_size: int,
    pad_id: int,
    *,
    seed: int,
    bucket: int = 20,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Endless seeded training batches (batch, labels): every epoch is a fresh shuffle, sorted
    by length within buckets of ``bucket`` batches, and the batches come out shuffled."""
    rng = random.Random(seed)
    n = len(encoded)
    size = min(batch_size, n)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        chunks = []
        for start in range(0, n, size * bucket):
            block = sorted(order[start : start + size * bucket], key=lambda i: len(encoded[i]))
            chunks += [block[k : k + size] for k in range(0, len(block), size)]
        rng.shuffle(chunks)
        for index in chunks:
            batch = pad_batch([encoded[i] for i in index], pad_id)
            yield batch, torch.as_tensor([labels[i] for i in index], dtype=torch.long)
