"""Calibration draws (seeded, stable, never from test) and the fixed test prefix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from task_data_files import text_folder

from epmq.data import Examples, TaskData, read_task_data
from epmq.errors import EpmqError

SRC = Path(__file__).resolve().parents[2] / "src"


def _task(name: str = "t", *, calib: bool = False, n: int = 40) -> TaskData:
    def split(prefix: str, count: int) -> Examples:
        return Examples([f"{prefix}{i}" for i in range(count)], [i % 3 for i in range(count)])

    return TaskData(
        name=name,
        modality="text",
        classes=("a", "b", "c"),
        train=split("train", n),
        test=split("test", 10),
        calib=split("calib", 15) if calib else None,
    )


def test_calibration_is_seeded_and_reproducible() -> None:
    task = _task()
    first = task.calibration(8, seed=0)
    assert len(first) == 8
    assert first == task.calibration(8, seed=0) == _task().calibration(8, seed=0)
    assert first != task.calibration(8, seed=1)
    assert first != _task("other").calibration(8, seed=0)  # the task name enters the seed


def test_calibration_keeps_split_order_and_pairs() -> None:
    chosen = _task().calibration(8, seed=3)
    positions = [int(str(text).removeprefix("train")) for text in chosen.inputs]
    assert positions == sorted(positions) and len(set(positions)) == 8
    assert chosen.labels == tuple(p % 3 for p in positions)


def test_calibration_never_draws_test_and_prefers_calib() -> None:
    task = _task(calib=True)
    chosen = task.calibration(10, seed=0)
    assert all(str(t).startswith("calib") for t in chosen.inputs)
    assert not set(chosen.inputs) & set(task.test.inputs)
    train_only = _task().calibration(40, seed=0)
    assert all(str(t).startswith("train") for t in train_only.inputs)


def test_calibration_all_when_fewer() -> None:
    task = _task(calib=True)
    assert task.calibration(100, seed=0) == task.calib
    with pytest.raises(EpmqError, match="calibration size must be >= 1"):
        task.calibration(0, seed=0)


def test_calibration_stable_across_hash_seeds() -> None:
    code = (
        "from epmq.data import Examples, TaskData\n"
        "s = Examples([str(i) for i in range(50)], [0] * 50)\n"
        "t = TaskData('reviews', 'text', ('x',), s, s)\n"
        "print(t.calibration(5, seed=7).inputs)\n"
        "import sys; assert 'torch' not in sys.modules  # reading data does not load torch\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(SRC)}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1


def test_calibration_from_read_data(tmp_path: Path) -> None:
    data = read_task_data("t", text_folder(tmp_path, calib=True), "csv")
    assert data.calib is not None
    assert data.calibration(2, seed=0).inputs[0] in data.calib.inputs


def test_test_examples_prefix() -> None:
    task = _task()
    assert task.test_examples(None) == task.test
    assert task.test_examples(3).inputs == ("test0", "test1", "test2")
    assert task.test_examples(99) == task.test
    with pytest.raises(EpmqError, match="test limit must be >= 1"):
        task.test_examples(0)


def test_examples_subset_and_validation() -> None:
    ex = Examples(["a", "b", "c"], (0, 1, 2))
    assert ex.subset([2, 0]) == Examples(("c", "a"), (2, 0))
    assert len(ex.subset([])) == 0
    with pytest.raises(EpmqError, match="3 inputs but 2 labels"):
        Examples(["a", "b", "c"], (0, 1))


def test_task_data_rejects_labels_outside_classes() -> None:
    ex = Examples(["a"], (3,))
    with pytest.raises(EpmqError, match=r"task t: train label 3 is outside the 2 classes"):
        TaskData("t", "text", ("x", "y"), ex, ex)
