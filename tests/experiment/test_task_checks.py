"""A user's tasks checked against their heads and splits when the workload is built.

- a task's ``classes`` list longer or shorter than its expert's head is refused, naming the
  field and both sizes (so are ``label_words`` that do not name one class each);
- calibration examples identical to test examples are one warning line with the count;
- an expert folder missing a tensor stops ``epmq run`` with one line on stderr.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from family_folders import BUILDERS, CLASSES, Family, write_data
from safetensors.torch import load_file, save_file

from epmq.data import TaskData, read_task_data
from epmq.errors import EpmqError
from epmq.experiment.config import parse_config
from epmq.experiment.folders import folder_workload
from epmq.heads.base import label_words

TASKS = ("first", "second")
LOGGER = "epmq.experiment.folders"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return BUILDERS["bert"](tmp_path_factory.mktemp("bert"), TASKS)


def _config(family: Family, root: Path) -> dict[str, Any]:
    tasks = [
        {
            "name": t,
            "data": str(write_data(family, t, "jsonl", root / "data" / t)),
            "format": "jsonl",
            "classes": list(CLASSES),
            "calib_size": 8,
        }
        for t in TASKS
    ]
    return {
        "name": "checks",
        "base": {"path": str(family.base)},
        "experts": [{"name": f"e-{t}", "path": str(family.experts[t]), "task": t} for t in TASKS],
        "tasks": tasks,
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["rtn"], "bits": [8]},
        "output": {"dir": str(root / "report")},
    }


def _rows(file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _write_rows(file: Path, rows: list[dict[str, Any]]) -> None:
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_classes_list_longer_than_the_head_is_refused(bert: Family, tmp_path: Path) -> None:
    config = _config(bert, tmp_path)
    config["tasks"][1]["classes"] = [*CLASSES, "delta"]  # no example is a delta
    with pytest.raises(EpmqError) as error:
        folder_workload(parse_config(config))
    message = str(error.value)
    assert message.startswith("task second: field 'classes' lists 4 classes")
    assert "e-second's head has 3 outputs" in message


def test_a_classes_list_shorter_than_the_head_is_refused(bert: Family, tmp_path: Path) -> None:
    config = _config(bert, tmp_path)
    data = Path(config["tasks"][0]["data"])
    for split in ("train", "calib", "test"):  # keep only the examples of the first two classes
        file = data / f"{split}.jsonl"
        _write_rows(file, [r for r in _rows(file) if r["label"] < 2])
    config["tasks"][0]["classes"] = list(CLASSES[:2])
    with pytest.raises(EpmqError, match=r"field 'classes' lists 2 classes .* has 3 outputs"):
        folder_workload(parse_config(config))


def test_label_words_must_name_one_class_each() -> None:
    data = SimpleNamespace(classes=("yes", "no"))
    task = SimpleNamespace(name="t", label_words=["good", "bad", "meh"])
    with pytest.raises(EpmqError, match=r"task t: 3 label_words for 2 classes"):
        label_words(task, data)  # type: ignore[arg-type]
    task.label_words = ["good", "bad"]
    assert label_words(task, data) == ["good", "bad"]  # type: ignore[arg-type]


def _task(config: dict[str, Any], index: int) -> TaskData:
    spec = config["tasks"][index]
    return read_task_data(spec["name"], Path(spec["data"]), "jsonl", classes=CLASSES)


def test_calibration_examples_that_are_test_examples_are_warned(
    bert: Family, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(bert, tmp_path)
    data = Path(config["tasks"][0]["data"])
    original = _task(config, 0)
    assert not set(original.calib.inputs) & set(original.test.inputs)  # disjoint as written
    calib, test = _rows(data / "calib.jsonl"), _rows(data / "test.jsonl")
    _write_rows(data / "calib.jsonl", [*test[:3], *calib[3:]])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        folder_workload(parse_config(config))
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == [
        f"task first: 3 of the 8 calibration examples are identical to test examples ({data}); "
        "the test accuracy is not held out from calibration"
    ]


def test_run_with_an_expert_missing_a_tensor_exits_2_with_one_line(
    bert: Family, tmp_path: Path
) -> None:
    config = _config(bert, tmp_path)
    expert = tmp_path / "expert"
    expert.mkdir()
    for file in Path(bert.experts["second"]).iterdir():
        (expert / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(expert / "model.safetensors"))
    del tensors["encoder.layer.1.intermediate.dense.weight"]
    save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
    config["experts"][1]["path"] = str(expert)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "epmq", "run", str(tmp_path / "run.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert str(expert) in lines[0] and "encoder.layer.1.intermediate.dense.weight" in lines[0]
