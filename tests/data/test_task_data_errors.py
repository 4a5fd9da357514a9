"""Every user mistake in task data is one EpmqError line naming the task, file and problem."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from task_data_files import TEST, TRAIN, text_folder, write_csv, write_jsonl

from epmq.data import read_task_data
from epmq.errors import EpmqError


def _error(name: str, path: Path, fmt: str, **kwargs: object) -> str:
    with pytest.raises(EpmqError) as info:
        read_task_data(name, path, fmt, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"task {name}: ")
    return message


def test_unknown_format_lists_the_known(tmp_path: Path) -> None:
    message = _error("t", tmp_path, "parquet")
    assert "unknown data format 'parquet' (known: csv, jsonl, npz, imagefolder, hf_disk)" in message


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "npz", "imagefolder", "hf_disk"])
def test_missing_path(tmp_path: Path, fmt: str) -> None:
    assert f"{tmp_path / 'nope'}: does not exist" in _error("t", tmp_path / "nope", fmt)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_without_data_files(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "readme.md").write_text("hi")
    message = _error("t", tmp_path, fmt)
    assert f"holds no .{fmt} files (expected train.{fmt} and test.{fmt})" in message


def test_folder_format_given_a_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", TRAIN)
    assert "is not a folder" in _error("t", path, "csv")


@pytest.mark.parametrize(("fmt", "missing"), [("csv", "test"), ("jsonl", "train")])
def test_missing_split_file(tmp_path: Path, fmt: str, missing: str) -> None:
    text_folder(tmp_path, f".{fmt}", calib=True)
    (tmp_path / f"{missing}.{fmt}").unlink()
    message = _error("t", tmp_path, fmt)
    assert f"has no {missing}.{fmt} (found: " in message


def test_csv_missing_column_names_the_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", TRAIN, header=("review", "label"))
    write_csv(tmp_path / "test.csv", TEST)
    message = _error("t", tmp_path, "csv")
    assert f"{tmp_path / 'train.csv'}: no column 'text' (columns: 'review', 'label')" in message


def test_jsonl_missing_field_and_bad_json(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", TRAIN)
    write_jsonl(tmp_path / "test.jsonl", TEST, keys=("text", "y"))
    message = _error("t", tmp_path, "jsonl")
    assert f"{tmp_path / 'test.jsonl'}:1: no field 'label' (fields: 'text', 'y')" in message
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": "pos"}\n\n{"text": oops}\n')
    assert f"{tmp_path / 'test.jsonl'}:3: not valid JSON" in _error("t", tmp_path, "jsonl")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('["a", "pos"]', "not a JSON object (got list)"),
        ('{"text": 3, "label": "pos"}', "field 'text' is not a string"),
        ('{"text": "a", "label": true}', "label True is neither an integer nor a class name"),
        ('{"text": "a", "label": 0.5}', "label 0.5 is neither an integer nor a class name"),
    ],
)
def test_jsonl_bad_rows(tmp_path: Path, row: str, message: str) -> None:
    write_jsonl(tmp_path / "test.jsonl", TEST)
    (tmp_path / "train.jsonl").write_text(row + "\n")
    assert f"train.jsonl:1: {message}" in _error("t", tmp_path, "jsonl")


def test_csv_short_row_and_empty_label(tmp_path: Path) -> None:
    write_csv(tmp_path / "test.csv", TEST)
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nlonely\n")
    assert "train.csv:3: has 1 cells but the header has 2" in _error("t", tmp_path, "csv")
    (tmp_path / "train.csv").write_text("text,label\ngood,\n")
    assert "train.csv:2: empty 'label' cell" in _error("t", tmp_path, "csv")


def test_csv_not_utf8(tmp_path: Path) -> None:
    write_csv(tmp_path / "test.csv", TEST)
    (tmp_path / "train.csv").write_bytes(b"text,label\n\xff\xfe,pos\n")
    assert "train.csv: is not UTF-8 text" in _error("t", tmp_path, "csv")


def test_integer_label_outside_classes(tmp_path: Path) -> None:
    text_folder(tmp_path, train=[("a", 0), ("b", 1), ("c", 2)], test=[("d", 5)])
    message = _error("t", tmp_path, "csv", classes=["x", "y", "z"])
    assert f"{tmp_path / 'test.csv'}:2: label 5 is not one of the 3 classes" in message
    assert "['x', 'y', 'z']" in message


def test_string_label_outside_given_classes(tmp_path: Path) -> None:
    text_folder(tmp_path, ".jsonl", test=[("hmm", "maybe")])
    message = _error("t", tmp_path, "jsonl", classes=["neg", "pos"])
    assert "test.jsonl:1: label 'maybe' is not one of the 2 classes ['neg', 'pos']" in message


def test_negative_label(tmp_path: Path) -> None:
    text_folder(tmp_path, ".jsonl", train=[("a", 0), ("b", -1)], test=[("c", 0)])
    assert "train.jsonl:2: label -1 is negative" in _error("t", tmp_path, "jsonl")


def test_bad_given_classes(tmp_path: Path) -> None:
    text_folder(tmp_path)
    assert "classes listed twice: ['pos']" in _error("t", tmp_path, "csv", classes=["pos", "pos"])
    assert "the list of classes is empty" in _error("t", tmp_path, "csv", classes=[])


@pytest.mark.parametrize("split", ["train", "test", "calib"])
def test_empty_split(tmp_path: Path, split: str) -> None:
    text_folder(tmp_path, calib=True)
    write_csv(tmp_path / f"{split}.csv", [])
    message = _error("t", tmp_path, "csv")
    assert f"{tmp_path / f'{split}.csv'}: the {split} split holds no examples" in message


def test_empty_image_split(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    assert "the train split holds no examples" in _error("t", tmp_path, "imagefolder")


def test_image_folder_without_splits(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    assert "holds no train/ or test/ folders" in _error("t", tmp_path, "imagefolder")
    (tmp_path / "train").mkdir()
    assert "has no test/ folder (folders: cat, train)" in _error("t", tmp_path, "imagefolder")


def _arrays(**arrays: object) -> dict[str, object]:
    base = {"x_train": ["a", "b"], "y_train": [0, 1], "x_test": ["c"], "y_test": [1]}
    return {k: v for k, v in {**base, **arrays}.items() if v is not None}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_arrays(y_test=None), "has no array 'y_test' (arrays: x_test, x_train, y_train)"),
        (_arrays(x_calib=["d"]), "has only one of 'x_calib' and 'y_calib'"),
        (_arrays(y_train=[0, 1, 1]), "x_train has 2 entries but y_train has 3"),
        (_arrays(y_train=[0.5, 1.0]), "y_train holds fractional labels"),
        (_arrays(x_train=[[1, 2], [3, 4]]), "x_train has shape [2, 2]; images must be"),
        (_arrays(x_train=[["a"], ["b"]]), "x_train holds strings but has shape [2, 1]"),
        (_arrays(y_test=[[1]]), "y_test has shape [1, 1], not [N]"),
        (_arrays(x_test=[True]), "x_test has dtype bool"),
        (_arrays(y_test=1), "y_test is a single value, not an array of examples"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, object], message: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    assert f"{path}: {message}" in _error("t", path, "npz")


def test_npz_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_text("hello")
    assert "is not a readable .npz file" in _error("t", tmp_path / "junk.npz", "npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    assert "is a single .npy array" in _error("t", tmp_path / "one.npy", "npz")
    assert "is a folder" in _error("t", tmp_path, "npz")


def test_npz_label_outside_classes_names_the_array(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in _arrays(y_test=[4]).items()})
    message = _error("t", path, "npz", classes=["a", "b"])
    expected = f"{path} [y_test], example 1: label 4 is not one of the 2 classes ['a', 'b']"
    assert re.search(re.escape(expected), message)


class _Payload:
    """Unpickling it creates ``marker``: what a crafted object array can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _crafted_npz(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    texts = np.empty(2, dtype=object)
    texts[:] = [_Payload(marker), "b"]
    path = tmp_path / "d.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in _arrays().items() if k != "x_train"},
             x_train=texts)  # fmt: skip
    return path, marker


def test_npz_object_array_refused_without_opt_in(tmp_path: Path) -> None:
    path, marker = _crafted_npz(tmp_path)
    message = _error("t", path, "npz")
    assert f"{path}: array 'x_train' is an object array, which only pickle reads" in message
    assert "np.array(texts, dtype=str)" in message and "allow_pickle: true" in message
    assert not marker.exists()  # nothing was unpickled


def test_npz_object_array_unpickled_only_with_opt_in(tmp_path: Path) -> None:
    path, marker = _crafted_npz(tmp_path)
    assert "x_train holds a" in _error("t", path, "npz", allow_pickle=True)
    assert marker.exists()  # the opt-in is what lets the file run code


def test_task_config_allow_pickle_reaches_the_reader(tmp_path: Path) -> None:
    from epmq.experiment.config import parse_config
    from epmq.experiment.folders import read_tasks

    path = tmp_path / "d.npz"
    arrays = {k: np.asarray(v) for k, v in _arrays().items()}
    np.savez(path, **{**arrays, "x_test": np.array(["c"], dtype=object)})
    task = {"name": "t", "data": str(path), "format": "npz"}
    config = {"base": {"path": "b"}, "experts": [{"name": "e", "path": "e", "task": "t"}]}
    with pytest.raises(EpmqError, match="array 'x_test' is an object array"):
        read_tasks(parse_config({**config, "tasks": [task]}))
    data = read_tasks(parse_config({**config, "tasks": [{**task, "allow_pickle": True}]}))
    assert data["t"].test.inputs == ("c",)
