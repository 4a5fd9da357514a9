"""``shared_examples``: calibration examples identical to test examples, found by content hash,
for texts and for each kind of image reference (files, array entries, dataset rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from epmq.data import ArrayImage, DatasetImage, Examples, FileImage, shared_examples


def _examples(inputs: list) -> Examples:
    return Examples(inputs, [0] * len(inputs))


def _pictures(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_texts_are_compared_exactly() -> None:
    calib = _examples(["a cat", "a dog", "A cat", "a cat ", "an owl", "a dog"])
    test = _examples(["a cat", "a dog", "a fox"])
    assert shared_examples(calib, test) == 3  # "a cat", "a dog" twice; case and space count
    assert shared_examples(test, _examples(["nothing"])) == 0


def test_array_images_with_the_same_pixels_are_shared() -> None:
    pixels = _pictures(4)
    calib_array = np.stack([pixels[0], pixels[1], pixels[2]])
    test_array = np.stack([pixels[3], pixels[1], pixels[0]])
    calib = _examples([ArrayImage(calib_array, i, "hwc") for i in range(3)])
    test = _examples([ArrayImage(test_array, i, "hwc") for i in range(3)])
    assert shared_examples(calib, test) == 2


def test_image_files_with_the_same_bytes_are_shared(tmp_path: Path) -> None:
    pixels = _pictures(3)
    paths = []
    for i, name in enumerate(["c0", "c1", "t0", "t1"]):
        path = tmp_path / f"{name}.png"
        Image.fromarray(pixels[[0, 1, 1, 2][i]]).save(path)
        paths.append(path)
    calib = _examples([FileImage(paths[0]), FileImage(paths[1])])
    test = _examples([FileImage(paths[2]), FileImage(paths[3])])
    assert shared_examples(calib, test) == 1  # c1 and t0 hold the same picture


def test_dataset_images_with_the_same_pixels_are_shared() -> None:
    datasets = pytest.importorskip("datasets")
    pixels = _pictures(3)
    features = datasets.Features({"image": datasets.Image()})
    rows = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(pixels[i]) for i in (0, 1, 0, 2)]}, features=features
    )
    calib = _examples([DatasetImage(rows, i, "image") for i in (0, 1)])
    test = _examples([DatasetImage(rows, i, "image") for i in (2, 3)])
    assert shared_examples(calib, test) == 1
