"""Every expert's head is checked on its calibration examples before any merging: a head whose
outputs follow another class order, or that reads another feature (``head_input``), is refused
with one line naming the fix; a weak head without a fix is one warning line."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import family_folders
import pytest
import torch
import yaml
from family_folders import CLASSES, Family, centred_head, clearest, save_head, texts

from epmq.errors import EpmqError
from epmq.experiment.config import parse_config
from epmq.experiment.session import run_session
from epmq.heads.checks import score
from epmq.heads.encoder import EncoderTasks

TASKS = ("first", "second")
PERMUTATION = [2, 0, 1]  # output i of the shuffled head is class PERMUTATION[i] of the original


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Family]:
    """The BERT family of family_folders with 40 training examples per task (a calibration
    draw large enough for a refusal; the csv format has no calibration split)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(family_folders, "N_TRAIN", 40)
    family = family_folders.build_bert(tmp_path_factory.mktemp("bert"), TASKS)
    yield family
    patch.undo()


def config_for(family: Family, root: Path, **task_fields: Any) -> dict[str, Any]:
    """A run over ``family``'s csv data (labels written as class names) with no ``classes``
    field unless given: the classes are then the sorted names."""
    tasks = []
    for task in TASKS:
        data = family_folders.write_data(family, task, "csv", root / "data" / task)
        tasks.append({"name": task, "data": str(data), "format": "csv", "calib_size": 32,
                      **task_fields.get(task, {})})  # fmt: skip
    return {
        "base": {"path": str(family.base)},
        "experts": [
            {"name": f"expert-{t}", "path": str(family.experts[t]), "task": t} for t in TASKS
        ],
        "tasks": tasks,
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["rtn"], "bits": [8]},
        "output": {"dir": str(root / "report")},
    }


def shuffled_expert(family: Family, root: Path) -> Family:
    """``family`` with the first expert's head rows permuted (a copy of the expert folder)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(family.experts["first"], root / "expert_first_shuffled"))
    state = load_file(str(folder / "head.safetensors"))
    save_file({k: v[PERMUTATION].contiguous() for k, v in state.items()},
              str(folder / "head.safetensors"))  # fmt: skip
    return Family(family.name, family.base, {**family.experts, "first": folder},
                  family.modality, family.splits, family.task_fields)  # fmt: skip


def test_score_matches_a_permuted_head() -> None:
    labels = [0, 1, 2, 0, 1, 2, 0, 0]
    predicted = torch.tensor([1, 2, 0, 1, 2, 0, 1, 2])  # output j stands for class j - 1
    found = score(predicted, labels, 3)
    assert found.accuracy == 0.0
    assert found.matched == 7 / 8
    assert found.matching == (2, 0, 1)
    assert found.chance == 4 / 8
    assert not found.checkable  # 8 examples: too few for a refusal


def test_shuffled_head_is_refused_naming_the_classes(
    bert: Family, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    family = shuffled_expert(bert, tmp_path)
    order = [CLASSES[c] for c in PERMUTATION]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_for(family, tmp_path)))
    done = subprocess.run(
        [sys.executable, "-m", "epmq", "run", str(path)], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "task first: expert expert-first's head predicts the classes in another order" in (
        done.stderr
    )
    assert f"set classes: [{', '.join(order)}]" in done.stderr
    assert "(0.0 % on calibration data as ordered, 100.0 % matched)" in done.stderr
    assert not (tmp_path / "report").exists()

    # The same project with the printed list runs, and the expert scores 100 %.
    fixed = config_for(family, tmp_path, first={"classes": order})
    with caplog.at_level(logging.WARNING, logger="epmq"):
        results, out = run_session(parse_config(fixed), progress=False, announce=lambda _: None)
    assert results.find(kind="expert")[0].accuracy == {t: 1.0 for t in TASKS}
    assert not [r for r in caplog.records if "calibration examples" in r.getMessage()]
    saved = yaml.safe_load((out / "results.json").read_text())
    tasks = saved["settings"]["workload"]["tasks"]
    assert tasks["first"]["expert_calibration_accuracy"] == 1.0


def test_a_small_calibration_draw_is_not_refused(bert: Family, tmp_path: Path) -> None:
    """On 8 calibration examples a matching proves too little: the run goes on."""
    family = shuffled_expert(bert, tmp_path)
    config = config_for(family, tmp_path)
    for task in config["tasks"]:
        task["calib_size"] = 8
    results, _ = run_session(parse_config(config), progress=False, announce=lambda _: None)
    assert results.find(kind="expert")[0].accuracy["first"] == 0.0


# -- head_input -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cls_trained(bert: Family, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """``bert`` whose first expert's head (and task labels) read the first token's state."""
    import shutil

    from transformers import AutoTokenizer, BertModel

    root = tmp_path_factory.mktemp("cls")
    folder = Path(shutil.copytree(bert.experts["first"], root / "expert_first_cls"))
    expert = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    inputs = texts(10, family_folders.POOL)
    with torch.no_grad():
        features = expert(**tok(inputs, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
        head = centred_head(32, 7, features)
        scores = head(features)
    save_head(folder, head)
    splits = {**bert.splits, "first": clearest(inputs, scores)}
    return Family(bert.name, bert.base, {**bert.experts, "first": folder}, bert.modality, splits)


def test_wrong_head_input_is_refused_naming_the_best(cls_trained: Family, tmp_path: Path) -> None:
    config = config_for(cls_trained, tmp_path)
    with pytest.raises(EpmqError) as caught:
        run_session(parse_config(config), progress=False, announce=lambda _: None)
    message = str(caught.value)
    assert message.startswith("task first: expert expert-first's head scores near chance")
    assert "set head_input: cls (100.0 % on calibration data; mean: " in message
    assert not (tmp_path / "report").exists()

    config["experts"][0]["head_input"] = "cls"
    results, _ = run_session(parse_config(config), progress=False, announce=lambda _: None)
    assert results.find(kind="expert")[0].accuracy == {t: 1.0 for t in TASKS}


def test_weak_head_without_other_head_inputs_warns(
    cls_trained: Family,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A family that offers no other head_input values: the same head is one warning."""
    monkeypatch.setattr(EncoderTasks, "head_inputs", ("mean",))  # nothing else to try
    with caplog.at_level(logging.WARNING, logger="epmq"):
        results, _ = run_session(
            parse_config(config_for(cls_trained, tmp_path)), progress=False,
            announce=lambda _: None,
        )  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "calibration examples" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("task first: expert expert-first's head reaches only ")
    assert results.find(kind="expert")[0].accuracy["first"] < 0.6
