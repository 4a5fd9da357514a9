"""Helpers that write tiny task-data files for the epmq.data tests."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Rows = Sequence[tuple[object, object]]

TRAIN: Rows = [("good film", "pos"), ("bad film", "neg"), ("great", "pos"), ("awful", "neg")]
TEST: Rows = [("fine film", "pos"), ("boring", "neg")]
CALIB: Rows = [("lovely", "pos"), ("dull", "neg"), ("superb", "pos")]


def write_csv(path: Path, rows: Rows, header: Sequence[str] = ("text", "label")) -> Path:
    """A CSV file with ``header`` and one row per ``(text, label)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: Rows, keys: Sequence[str] = ("text", "label")) -> Path:
    """A JSON-lines file, one object per ``(text, label)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(dict(zip(keys, row, strict=True))) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def text_folder(
    root: Path, suffix: str = ".csv", *, calib: bool = False, train: Rows = TRAIN, test: Rows = TEST
) -> Path:
    """A csv/jsonl task folder with train, test and (optionally) calib files."""
    write = write_csv if suffix == ".csv" else write_jsonl
    write(root / f"train{suffix}", train)
    write(root / f"test{suffix}", test)
    if calib:
        write(root / f"calib{suffix}", CALIB)
    return root


def save_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (6, 5)) -> Path:
    """A small solid-colour PNG (``size`` is width × height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def image_folder(root: Path, *, calib: bool = False) -> Path:
    """An imagefolder task: classes cat (red) and dog (blue), two train images each."""
    splits = {"train": 2, "test": 1, **({"calib": 1} if calib else {})}
    for split, count in splits.items():
        for i in range(count):
            save_png(root / split / "cat" / f"{i}.png", (255, 0, 0))
            save_png(root / split / "dog" / f"{i}.jpg", (0, 0, 255))
    return root


def random_rgb(seed: int, height: int, width: int) -> np.ndarray:
    """A seeded random ``[H, W, 3]`` uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
