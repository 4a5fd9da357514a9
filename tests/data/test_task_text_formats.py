"""Text tasks from csv, jsonl and npz files; how classes and labels are settled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from task_data_files import CALIB, TEST, TRAIN, text_folder, write_csv, write_jsonl

from epmq.data import FORMATS, TaskData, read_task_data
from epmq.errors import EpmqError


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_folder_formats(tmp_path: Path, fmt: str) -> None:
    root = text_folder(tmp_path / "reviews", f".{fmt}")
    data = read_task_data("reviews", root, fmt)
    assert isinstance(data, TaskData)
    assert data.name == "reviews" and data.modality == "text"
    assert data.classes == ("neg", "pos")  # sorted distinct train labels
    assert data.train.inputs == tuple(t for t, _ in TRAIN)
    assert data.train.labels == (1, 0, 1, 0)
    assert data.test.inputs == ("fine film", "boring") and data.test.labels == (1, 0)
    assert data.calib is None
    assert data.source == str(root)
    assert len(data.train) == 4 and data.num_classes == 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_calib_file_is_the_calibration_split(tmp_path: Path, fmt: str) -> None:
    data = read_task_data("t", text_folder(tmp_path, f".{fmt}", calib=True), fmt)
    assert data.calib is not None
    assert data.calib.inputs == tuple(t for t, _ in CALIB)
    assert data.calib.labels == (1, 0, 1)


def test_csv_columns_quotes_and_blank_rows(tmp_path: Path) -> None:
    rows = [("a", '"hello, world"', "1"), ("b", '"two\nlines"', "0"), ("c", "x", "2")]
    body = "id,sentence,y\n" + "\n".join(",".join(r) for r in rows) + "\n,,\n"
    (tmp_path / "train.csv").write_text(body, encoding="utf-8")
    (tmp_path / "test.csv").write_text("id,sentence,y\nd,z,1\n", encoding="utf-8")
    data = read_task_data("t", tmp_path, "csv", text_column="sentence", label_column="y")
    assert data.train.inputs == ("hello, world", "two\nlines", "x")
    # whole-number cells are class indices; classes are "0".."max"
    assert data.train.labels == (1, 0, 2) and data.classes == ("0", "1", "2")


def test_whole_numbers_with_named_classes(tmp_path: Path) -> None:
    text_folder(tmp_path, train=[("a", 0), ("b", 1)], test=[("c", 1)])
    data = read_task_data("t", tmp_path, "csv", classes=["neg", "pos"])
    assert data.classes == ("neg", "pos") and data.train.labels == (0, 1)


def test_whole_number_names_match_given_classes_by_name(tmp_path: Path) -> None:
    text_folder(tmp_path, train=[("a", 3), ("b", 1)], test=[("c", 2)])
    data = read_task_data("t", tmp_path, "csv", classes=["1", "2", "3"])
    assert data.train.labels == (2, 0) and data.test.labels == (1,)


def test_given_classes_order_maps_names(tmp_path: Path) -> None:
    data = read_task_data("t", text_folder(tmp_path), "csv", classes=("pos", "neg"))
    assert data.classes == ("pos", "neg") and data.train.labels == (0, 1, 0, 1)


def test_integer_classes_span_all_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [("a", 0), ("b", 1)])
    write_jsonl(tmp_path / "test.jsonl", [("c", 1)])
    write_jsonl(tmp_path / "calib.jsonl", [("d", 3.0)])  # a whole float is an index
    data = read_task_data("t", tmp_path, "jsonl")
    assert data.classes == ("0", "1", "2", "3")
    assert data.calib is not None and data.calib.labels == (3,)


def test_jsonl_other_fields_and_blank_lines(tmp_path: Path) -> None:
    rows = [{"id": 1, "body": "x", "tag": "a"}, {"id": 2, "body": "y", "tag": "b"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    data = read_task_data("t", tmp_path, "jsonl", text_column="body", label_column="tag")
    assert data.train.inputs == ("x", "y") and data.classes == ("a", "b")


def test_npz_text(tmp_path: Path) -> None:
    path = tmp_path / "task.npz"
    np.savez(
        path,
        x_train=np.array(["a", "b", "c"]),
        y_train=np.array([0, 1, 1]),
        x_test=np.array(["d"], dtype=object),
        y_test=np.array([1]),
        x_calib=np.array([b"e", b"f"]),
        y_calib=np.array([0, 0]),
    )
    data = read_task_data("t", path, "npz", allow_pickle=True)  # x_test is an object array
    assert data.modality == "text"
    assert data.train.inputs == ("a", "b", "c") and data.test.inputs == ("d",)
    assert data.calib is not None and data.calib.inputs == ("e", "f")
    assert data.classes == ("0", "1")


def test_npz_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "task.npz"
    np.savez(
        path,
        x_train=np.array(["a", "b"]),
        y_train=np.array(["spam", "ham"]),
        x_test=np.array(["c"]),
        y_test=np.array(["spam"]),
    )
    data = read_task_data("t", path, "npz")
    assert data.classes == ("ham", "spam") and data.train.labels == (1, 0)


def test_formats_registry() -> None:
    assert set(FORMATS) == {"csv", "jsonl", "npz", "imagefolder", "hf_disk"}


def test_string_path_and_user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    text_folder(tmp_path / "task")
    data = read_task_data("t", "~/task", "csv")  # type: ignore[arg-type]
    assert data.source == str(tmp_path / "task")


def test_mixed_label_kinds_are_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [("a", 0), ("b", "pos")])
    write_jsonl(tmp_path / "test.jsonl", [("c", 0)])
    with pytest.raises(EpmqError, match="mix class indices and class names"):
        read_task_data("t", tmp_path, "jsonl")


def test_test_label_unseen_in_train(tmp_path: Path) -> None:
    text_folder(tmp_path, test=[*TEST, ("hmm", "maybe")])
    with pytest.raises(EpmqError) as info:
        read_task_data("t", tmp_path, "csv")
    message = str(info.value)
    assert "task t:" in message and "test.csv:4" in message
    assert "label 'maybe' is not one of the 2 classes ['neg', 'pos']" in message


def test_csv_written_by_helper_round_trips(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", [("a;b", "x")])
    write_csv(tmp_path / "test.csv", [("c", "x")])
    assert read_task_data("t", tmp_path, "csv").train.inputs == ("a;b",)


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_bytes("text,label\nhé,pos\nnon,neg\n".encode("utf-8-sig"))
    write_csv(tmp_path / "test.csv", TEST)
    assert read_task_data("t", tmp_path, "csv").train.inputs == ("hé", "non")
