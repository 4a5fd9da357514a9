"""Tasks and their fixed train / calibration / test splits.

A :class:`Task` is a named text-classification problem with class names and three disjoint
splits. :func:`make_splits` builds them reproducibly from a labelled pool: identical texts are
merged first (a text seen with two different labels is dropped), so no text can land in two
splits; the pool is then shuffled with a seed derived from the task name and the suite seed,
optionally balanced across classes, and cut into test, calibration and train parts that share
the same class mix.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from epmq.errors import EpmqError


class Split(NamedTuple):
    """Texts and their integer labels (indices into :attr:`Task.classes`)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    """A text-classification task with fixed, disjoint splits.

    ``max_length`` is the tokenized length inputs are cut to; ``truncation_side="left"``
    keeps the end of long inputs (reviews tend to state their verdict last).
    """

    name: str
    classes: tuple[str, ...]
    train: Split
    calib: Split
    test: Split
    max_length: int = 64
    truncation_side: Literal["left", "right"] = "right"
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def calibration_texts(self, examples: int | None = None) -> tuple[str, ...]:
        """The texts calibration reads: the calibration split, cut to its first ``examples``,
        or topped up with the training split's first examples when more are asked (the
        experts' own training data; the test split is never read). None: the split as is."""
        if examples is None:
            return self.calib.texts
        if examples < 1:
            raise EpmqError(f"task {self.name}: calibration examples must be >= 1")
        pool = self.calib.texts + self.train.texts
        if examples > len(pool):
            raise EpmqError(
                f"task {self.name}: {examples} calibration examples asked, but its calibration "
                f"and training splits hold {len(pool)}"
            )
        return pool[:examples]

    def split(self, name: str) -> Split:
        """The split called ``train``, ``calib`` or ``test``."""
        if name not in ("train", "calib", "test"):
            raise EpmqError(f"task {self.name}: unknown split {name!r} (train, calib, test)")
        return getattr(self, name)


def derived_seed(seed: int, *names: str) -> int:
    """A stable 63-bit seed from a base seed and names (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def dedupe(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """Keep each distinct text once, in first-seen order; drop texts with conflicting labels."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, labels, strict=True):
        if text in first and first[text] != label:
            conflicting.add(text)
        first.setdefault(text, label)
    kept = [(t, y) for t, y in first.items() if t not in conflicting]
    return [t for t, _ in kept], [y for _, y in kept]


def make_splits(
    name: str,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    n_train: int,
    n_calib: int,
    n_test: int,
    seed: int,
    balance: bool = True,
) -> tuple[Split, Split, Split]:
    """Cut a labelled pool into disjoint (train, calib, test) splits.

    With ``balance`` the examples are drawn round-robin over the classes (in a seeded order),
    so small classes are kept whole and large ones are subsampled; without it the draw is a
    plain seeded shuffle that keeps the natural class mix. When the pool is smaller than the
    three sizes together, the test split is filled first, then calibration, then training.
    """
    if min(n_train, n_calib, n_test) < 0:
        raise EpmqError(f"task {name}: split sizes must be >= 0")
    texts, labels = dedupe(texts, labels)
    rng = random.Random(derived_seed(seed, name))
    order = list(range(len(texts)))
    rng.shuffle(order)
    if balance:
        by_class: dict[int, list[int]] = defaultdict(list)
        for i in order:
            by_class[labels[i]].append(i)
        # rank within class, ties broken by the shuffled position: a round-robin draw.
        rank = {i: r for members in by_class.values() for r, i in enumerate(members)}
        position = {i: p for p, i in enumerate(order)}
        order.sort(key=lambda i: (rank[i], position[i]))
    chosen = order[: n_train + n_calib + n_test]
    rng.shuffle(chosen)
    n_test_real = min(n_test, len(chosen))
    n_calib_real = min(n_calib, len(chosen) - n_test_real)
    parts = (
        chosen[n_test_real + n_calib_real :],
        chosen[n_test_real : n_test_real + n_calib_real],
        chosen[:n_test_real],
    )
    train, calib, test = (
        Split(tuple(texts[i] for i in part), tuple(labels[i] for i in part)) for part in parts
    )
    if not train.texts or not test.texts:
        raise EpmqError(f"task {name}: only {len(texts)} distinct examples, too few to split")
    return train, calib, test


def build_task(
    name: str,
    classes: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    sizes: tuple[int, int, int],
    seed: int,
    balance: bool = True,
    max_length: int = 64,
    truncation_side: Literal["left", "right"] = "right",
    description: str = "",
) -> Task:
    """:func:`make_splits` plus the task metadata; ``sizes`` is (train, calib, test)."""
    bad = sorted({y for y in labels if not 0 <= y < len(classes)})
    if bad:
        raise EpmqError(f"task {name}: labels {bad[:5]} outside 0..{len(classes) - 1}")
    n_train, n_calib, n_test = sizes
    train, calib, test = make_splits(
        name,
        texts,
        labels,
        n_train=n_train,
        n_calib=n_calib,
        n_test=n_test,
        seed=seed,
        balance=balance,
    )
    return Task(name, tuple(classes), train, calib, test, max_length, truncation_side, description)
