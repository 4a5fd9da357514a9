"""``epmq run/demo --resume`` continues only a run on the same inputs.

A run is stopped after its first model; then an input is replaced in place (same shapes, same
names: only the content differs) and the resume is refused, naming the changed input, with
exit code 2 and one line from the command line. An unchanged resume ends with the report of
the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from family_folders import write_project
from safetensors import safe_open
from safetensors.torch import save_file

from epmq.atomic import partial_dir
from epmq.cli import main
from epmq.errors import EpmqError
from epmq.experiment.config import load_config, parse_config
from epmq.experiment.journal import JOURNAL_FILE, Journal
from epmq.experiment.session import run_session

TASKS = ("first", "second")


class Stop(Exception):
    """Stands in for Ctrl-C or a killed job."""


def _stop_after_first_model(line: str) -> None:
    if line.startswith("  "):  # a finished model's line
        raise Stop


def _replace_weights(file: Path) -> None:
    """Rewrite a safetensors file in place: same names and shapes, other values."""
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dim() == 2:
            tensors[name] = tensor + 0.05 * torch.randn(tensor.shape)
    save_file(tensors, str(file), metadata=metadata)


def _edit_text(file: Path) -> None:
    lines = file.read_text().splitlines(keepends=True)
    file.write_text("".join([*lines[1:], lines[0]]))  # same examples, another order


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    write_project(root, TASKS, quantization={"methods": ["rtn", "gptq"], "bits": [8]})
    return root


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the project, with a run of it stopped after its first model."""
    root = Path(shutil.copytree(template, tmp_path / "project"))
    with pytest.raises(Stop):
        run_session(load_config(root / "run.yaml"), announce=_stop_after_first_model)
    assert (partial_dir(root / "report") / JOURNAL_FILE).is_file()
    return root


def _results(folder: Path) -> dict[str, Any]:
    saved = json.loads((folder / "results.json").read_text())
    return {"rows": [(r["name"], r["accuracy"]) for r in saved["rows"]]}


def test_unchanged_inputs_resume_to_the_uninterrupted_report(
    project: Path, template: Path, tmp_path: Path
) -> None:
    reference = Path(shutil.copytree(template, tmp_path / "reference"))
    run_session(load_config(reference / "run.yaml"), announce=lambda line: None)
    lines: list[str] = []
    run_session(load_config(project / "run.yaml"), resume=True, announce=lines.append)
    assert any("1 models already finished" in line for line in lines)
    assert _results(project / "report") == _results(reference / "report")


CHANGES = [
    pytest.param(
        lambda root: _replace_weights(root / "expert_first" / "model.safetensors"),
        "inputs.expert first: model.safetensors changed", id="expert weights",
    ),
    pytest.param(
        lambda root: _replace_weights(root / "base" / "model.safetensors"),
        "inputs.base model: model.safetensors changed", id="base weights",
    ),
    pytest.param(
        lambda root: _replace_weights(root / "expert_second" / "head.safetensors"),
        "inputs.expert second: head.safetensors changed", id="head",
    ),
    pytest.param(
        lambda root: _edit_text(root / "data" / "first" / "test.jsonl"),
        "inputs.data of task first: test.jsonl changed", id="task data",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), CHANGES)
def test_resume_after_an_input_changed_is_refused_naming_it(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[Path], None],
    message: str,
) -> None:
    journal = partial_dir(project / "report") / JOURNAL_FILE
    saved = journal.read_bytes()
    change(project)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["epmq", "run", str(project / "run.yaml"), "--resume"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("epmq: error: ")
    assert "other settings or inputs" in err and message in err
    assert journal.read_bytes() == saved and not (project / "report").exists()


def test_suite_resume_after_an_expert_changed_in_the_cache_is_refused(tmp_path: Path) -> None:
    config = parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
            "quantization": {"methods": ["rtn"], "bits": [8]},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    cache = tmp_path / "cache"

    def run(**kwargs: Any) -> Any:
        kwargs.setdefault("announce", lambda line: None)
        return run_session(config, quick=True, cache_dir=cache, progress=False, **kwargs)

    with pytest.raises(Stop):
        run(announce=_stop_after_first_model)
    experts = sorted(cache.glob("*/*/experts/*/model.safetensors"))
    assert experts
    _replace_weights(experts[0])
    task = experts[0].parent.name
    with pytest.raises(EpmqError, match=f"suite expert {task}: model.safetensors changed"):
        run(resume=True)


def test_journal_names_a_changed_setting_by_its_dotted_path(tmp_path: Path) -> None:
    Journal(tmp_path, {"config": {"quantization": {"alpha": 0.1, "bits": [4]}}}, resume=False)
    changed = {"config": {"quantization": {"alpha": 0.5, "bits": [4]}}}
    with pytest.raises(EpmqError, match=r"\(config\.quantization\.alpha 0\.1 → 0\.5\)"):
        Journal(tmp_path, changed, resume=True)
