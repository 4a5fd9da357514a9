"""Tasks saved with ``datasets.DatasetDict.save_to_disk``: text with ClassLabel, images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from task_data_files import random_rgb

from epmq.data import DatasetImage, load_images, read_task_data
from epmq.errors import EpmqError

datasets = pytest.importorskip("datasets")


def _text_dict(**splits: tuple[list[str], list[int]]) -> object:
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"sentence": x, "label": y}, features=features)
            for name, (x, y) in splits.items()
        }
    )


def test_text_with_class_label(tmp_path: Path) -> None:
    saved = _text_dict(
        train=(["good", "bad", "fine"], [1, 0, 1]),
        test=(["meh"], [0]),
        validation=(["ok", "no"], [1, 0]),
    )
    saved.save_to_disk(str(tmp_path / "ds"))
    data = read_task_data("sst", tmp_path / "ds", "hf_disk", text_column="sentence")
    assert data.modality == "text" and data.classes == ("neg", "pos")
    assert data.train.inputs == ("good", "bad", "fine") and data.train.labels == (1, 0, 1)
    assert data.test.inputs == ("meh",)
    assert data.calib is not None and data.calib.inputs == ("ok", "no")  # validation split


def test_calibration_split_preference(tmp_path: Path) -> None:
    saved = _text_dict(
        train=(["a"], [0]), test=(["b"], [1]), validation=(["v"], [0]), calib=(["c"], [1])
    )
    saved.save_to_disk(str(tmp_path / "ds"))
    data = read_task_data("t", tmp_path / "ds", "hf_disk", text_column="sentence")
    assert data.calib is not None and data.calib.inputs == ("c",)


def test_string_labels_without_class_label(tmp_path: Path) -> None:
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["spam", "ham"]}),
        test=datasets.Dataset.from_dict({"text": ["c"], "label": ["spam"]}),
    )
    saved.save_to_disk(str(tmp_path / "ds"))
    data = read_task_data("t", tmp_path / "ds", "hf_disk")
    assert data.classes == ("ham", "spam") and data.train.labels == (1, 0)


def test_images_with_image_feature(tmp_path: Path) -> None:
    pictures = [Image.fromarray(random_rgb(i, 8, 9)) for i in range(3)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": pictures[:2], "label": [0, 2]}, features=features),
        test=datasets.Dataset.from_dict({"img": pictures[2:], "label": [1]}, features=features),
    )
    saved.save_to_disk(str(tmp_path / "ds"))
    data = read_task_data("pics", tmp_path / "ds", "hf_disk", image_column="img")
    assert data.modality == "image" and data.classes == ("0", "1", "2")
    assert all(isinstance(ref, DatasetImage) for ref in data.train.inputs)
    loaded = load_images(data.train.inputs)
    assert loaded[1].mode == "RGB"
    assert np.array_equal(np.asarray(loaded[1]), np.asarray(pictures[1]))


def test_single_dataset_is_an_error(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(EpmqError, match="holds a single Dataset"):
        read_task_data("t", tmp_path / "ds", "hf_disk")


def test_missing_split_and_columns(tmp_path: Path) -> None:
    _text_dict(train=(["a"], [0]), validation=(["b"], [1])).save_to_disk(str(tmp_path / "a"))
    with pytest.raises(EpmqError, match=r"has no 'test' split \(splits: train, validation\)"):
        read_task_data("t", tmp_path / "a", "hf_disk", text_column="sentence")
    _text_dict(train=(["a"], [0]), test=(["b"], [1])).save_to_disk(str(tmp_path / "b"))
    with pytest.raises(EpmqError, match="neither a 'text' nor an 'image' column"):
        read_task_data("t", tmp_path / "b", "hf_disk")
    with pytest.raises(EpmqError, match="no column 'y'"):
        read_task_data("t", tmp_path / "b", "hf_disk", text_column="sentence", label_column="y")


def test_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EpmqError, match="holds no saved dataset"):
        read_task_data("t", tmp_path / "empty", "hf_disk")
    with pytest.raises(EpmqError, match="does not exist"):
        read_task_data("t", tmp_path / "missing", "hf_disk")


def test_label_outside_class_label(tmp_path: Path) -> None:
    _text_dict(train=(["a"], [0]), test=(["b"], [1])).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(EpmqError, match=r"label 1 is not one of the 1 classes \['only'\]"):
        read_task_data("t", tmp_path / "ds", "hf_disk", text_column="sentence", classes=["only"])


def test_missing_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(EpmqError, match="pip install datasets"):
        read_task_data("t", tmp_path, "hf_disk")


def test_undecodable_image_names_the_row(tmp_path: Path) -> None:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    junk = {"bytes": b"not an image", "path": None}
    good = Image.fromarray(random_rgb(0, 4, 4))
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"image": [good, junk], "label": [0, 1]}, features=features
        ),
        test=datasets.Dataset.from_dict({"image": [good], "label": [1]}, features=features),
    )
    saved.save_to_disk(str(tmp_path / "ds"))
    data = read_task_data("pics", tmp_path / "ds", "hf_disk")
    assert load_images(data.train.inputs[:1])[0].size == (4, 4)
    with pytest.raises(
        EpmqError, match=r"task pics: cannot read image .*\[train\]\[1\]\['image'\]"
    ):
        load_images(data.train.inputs)
