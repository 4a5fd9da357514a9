"""A task's labelled data: :class:`Examples` (one split) and :class:`TaskData` (all of them).

Inputs are texts or lazy :class:`~epmq.data.image_refs.ImageRef` objects; labels are indices into
:attr:`TaskData.classes`. Calibration examples come from the calibration split when the data
has one, else from training, never from test; the draw is seeded from the run's seed and the
task name with SHA-256, so it is the same on every run and under any ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from epmq.data.image_refs import ImageRef
from epmq.errors import EpmqError

Modality = Literal["text", "image"]


@dataclass(frozen=True)
class Examples:
    """One split: ``inputs[i]`` (a text or an image reference) has class ``labels[i]``."""

    inputs: Sequence[str] | Sequence[ImageRef]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "labels", tuple(int(y) for y in self.labels))
        if len(self.inputs) != len(self.labels):
            raise EpmqError(f"{len(self.inputs)} inputs but {len(self.labels)} labels in one split")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Examples:
        """The examples at ``indices``, in that order."""
        return Examples(
            tuple(self.inputs[i] for i in indices), tuple(self.labels[i] for i in indices)
        )


def shared_examples(examples: Examples, others: Examples) -> int:
    """How many of ``examples`` are identical to one of ``others``: the same text, or an image
    of the same content (:meth:`~epmq.data.image_refs.ImageRef.digest`); labels aside."""
    seen = {_digest(item) for item in others.inputs}
    return sum(_digest(item) in seen for item in examples.inputs)


def _digest(item: str | ImageRef) -> bytes:
    if isinstance(item, ImageRef):
        return b"image:" + item.digest()
    return b"text:" + hashlib.sha256(str(item).encode("utf-8")).digest()


def calibration_seed(seed: int, task: str) -> int:
    """A stable 63-bit seed for a task's calibration draw (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{seed}:{task}:calibration".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class TaskData:
    """A labelled classification task read from disk.

    ``calib`` is the data's own calibration split when it has one; ``source`` is the path read
    (for messages). Every label indexes ``classes``.
    """

    name: str
    modality: Modality
    classes: tuple[str, ...]
    train: Examples
    test: Examples
    calib: Examples | None = None
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.modality not in ("text", "image"):
            raise EpmqError(f"task {self.name}: unknown modality {self.modality!r}")
        splits = {"train": self.train, "test": self.test, "calib": self.calib}
        for split, examples in splits.items():
            if examples is None:
                continue
            bad = [y for y in examples.labels if not 0 <= y < len(self.classes)]
            if bad:
                raise EpmqError(
                    f"task {self.name}: {split} label {bad[0]} is outside the "
                    f"{len(self.classes)} classes {list(self.classes)}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def calibration(self, size: int, seed: int) -> Examples:
        """``size`` examples for calibration, drawn without replacement with a seed derived
        from ``seed`` and the task name, in split order.

        They come from the calibration split when there is one, else from training; never
        from test. All of them are returned when the split holds fewer than ``size``.
        """
        if size < 1:
            raise EpmqError(f"task {self.name}: calibration size must be >= 1, got {size}")
        pool = self.calib if self.calib is not None else self.train
        if size >= len(pool):
            return pool
        rng = random.Random(calibration_seed(seed, self.name))
        return pool.subset(sorted(rng.sample(range(len(pool)), size)))

    def test_examples(self, limit: int | None) -> Examples:
        """The first ``limit`` test examples (a fixed prefix), or all of them for ``None``."""
        if limit is None or limit >= len(self.test):
            return self.test
        if limit < 1:
            raise EpmqError(f"task {self.name}: test limit must be >= 1, got {limit}")
        return self.test.subset(range(limit))
