"""Experts (and bases) saved in several safetensors shards, or as pickled ``pytorch_model.bin``
weights (single or sharded), run through ``epmq run`` and give the same merged model as the
same weights in one ``model.safetensors``; a ``.bin`` that needs a full unpickling is refused
naming the file, and nothing runs or is written."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiment"))
from family_folders import write_project

from epmq.experiment.config import parse_config
from epmq.experiment.session import run_session

TASKS = ("first", "second")
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's BERT project (relative paths) that exports its quantized variants."""
    root = tmp_path_factory.mktemp("project")
    write_project(root, TASKS, output={"dir": "report", "export": ["dequantized"]})
    return root


def project_copy(template: Path, root: Path) -> Path:
    return Path(shutil.copytree(template, root / "project"))


def as_shards(folder: Path) -> None:
    """Rewrite ``folder``'s weights as several safetensors shards (``save_pretrained`` with a
    small ``max_shard_size``)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    (folder / WEIGHTS).unlink()
    model.save_pretrained(str(folder), max_shard_size="20KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1


def as_bin(folder: Path, *, sharded: bool = False, extra: Any = None) -> None:
    """Rewrite ``folder``'s weights as pickled ``pytorch_model.bin`` (``torch.save`` of the
    state dict, as ``save_pretrained`` wrote them before safetensors), or two ``.bin`` shards
    with their index; ``extra`` adds a non-tensor entry."""
    state = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    if extra is not None:
        state["extra"] = extra
    if not sharded:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}  # fmt: skip
    for file, part in shards.items():
        torch.save({n: state[n] for n in part}, folder / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def exported(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every exported variant's tensors, by variant folder."""
    found = {}
    for config in sorted(out.glob("exports/**/config.json")):
        folder = config.parent
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        found[str(folder.relative_to(out))] = tensors
    return found


def run(project: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    config = yaml.safe_load((project / "run.yaml").read_text())
    config["base"]["path"] = str(project / "base")
    for expert in config["experts"]:
        expert["path"] = str(project / expert["path"])
    for task in config["tasks"]:
        task["data"] = str(project / task["data"])
    config["output"]["dir"] = str(project / "report")
    results, out = run_session(parse_config(config), progress=False, announce=lambda _: None)
    return {r.name: r.accuracy for r in results.rows}, exported(out)


@pytest.fixture(scope="module")
def reference(template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return run(project_copy(template, tmp_path_factory.mktemp("reference")))


@pytest.mark.parametrize("layout", ["shards", "bin", "bin-shards"])
def test_other_layouts_give_the_same_merged_model(
    layout: str,
    template: Path,
    reference: tuple[Any, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = project_copy(template, tmp_path)
    for task in TASKS:
        folder = project / f"expert_{task}"
        if layout == "shards":
            as_shards(folder)
        else:
            as_bin(folder, sharded=layout == "bin-shards")
    if layout == "shards":
        as_shards(project / "base")  # a sharded base: the merge keeps its shard layout
    with caplog.at_level(logging.WARNING, logger="epmq"):
        rows, exports = run(project)
    want_rows, want_exports = reference
    assert rows == want_rows
    assert exports.keys() == want_exports.keys() and exports
    for variant, tensors in want_exports.items():
        assert tensors.keys() == exports[variant].keys()
        for name, tensor in tensors.items():
            assert torch.equal(exports[variant][name], tensor), (variant, name)
    notes = [r.getMessage() for r in caplog.records if "pickled .bin weights" in r.getMessage()]
    if layout == "shards":
        assert notes == []
    else:  # one line per expert folder, however often it is read, suggesting safetensors
        assert len(notes) == len(TASKS)
        assert all("convert them to safetensors" in note for note in notes)


class _RunsCode:
    """Unpickling this would run code: write a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "ran"))


@pytest.mark.parametrize("sharded", [False, True])
def test_bin_that_needs_unpickling_is_refused(
    sharded: bool, template: Path, tmp_path: Path
) -> None:
    project = project_copy(template, tmp_path)
    marker = tmp_path / "marker"
    as_bin(project / "expert_second", sharded=sharded, extra=_RunsCode(marker))
    done = subprocess.run(
        [sys.executable, "-m", "epmq", "run", str(project / "run.yaml")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"epmq: error: {project / 'expert_second'}/pytorch_model")
    assert "needs a full unpickling" in done.stderr and "safetensors" in done.stderr
    assert not marker.exists() and not (project / "report").exists()


def test_index_without_metadata_is_one_line(template: Path, tmp_path: Path) -> None:
    """transformers' loader reads an index's "metadata": one missing is named, not a
    traceback."""
    project = project_copy(template, tmp_path)
    as_bin(project / "expert_first", sharded=True)
    index = project / "expert_first" / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": json.loads(index.read_text())["weight_map"]}))
    done = subprocess.run(
        [sys.executable, "-m", "epmq", "run", str(project / "run.yaml")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"epmq: error: {index}: no 'metadata' object (save_pretrained " + (
        'writes one; add "metadata": {})\n'
    )


def quantize(project: Path, out: Path) -> dict[str, torch.Tensor]:
    """``epmq quantize`` (E-PMQ, layer inputs from the experts, read tensor by tensor) of the
    project's base with its two experts; the exported tensors."""
    from epmq.cli import main

    argv = ["epmq", "quantize", "--model", str(project / "base"), "--method", "epmq",
            "--bits", "4", "--group-size", "-1", "--out", str(out), "--format", "dequantized",
            "--calib-size", "8", "--max-length", "16", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    for task in TASKS:
        argv += ["--calib", f"{task}={project / 'data' / task / 'train.jsonl'}"]
        argv += ["--expert", f"{task}={project / f'expert_{task}'}"]
    old = sys.argv
    sys.argv = argv
    try:
        main()
    except SystemExit as stop:
        assert stop.code in (0, None), stop.code
    finally:
        sys.argv = old
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_quantize_reads_sharded_and_bin_folders(template: Path, tmp_path: Path) -> None:
    """``epmq quantize`` on a sharded base with ``.bin`` and sharded experts equals the same
    weights in single safetensors files."""
    want = quantize(project_copy(template, tmp_path / "single"), tmp_path / "single-out")
    project = project_copy(template, tmp_path / "other")
    as_shards(project / "base")
    as_bin(project / "expert_first")
    as_shards(project / "expert_second")
    got = quantize(project, tmp_path / "other-out")
    assert want and got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
