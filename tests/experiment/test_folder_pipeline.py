"""``epmq run`` on a user's folders: every family and every data format, end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from family_folders import BUILDERS, CLASSES, Family, write_data

from epmq.errors import EpmqError
from epmq.eval.results import average, load_results
from epmq.experiment.config import parse_config
from epmq.experiment.session import run_session

TASKS = ("first", "second")
CASES = [
    ("bert", "csv"),
    ("bert", "jsonl"),
    ("bert", "npz"),
    ("bert", "hf_disk"),
    ("clip", "imagefolder"),
    ("clip", "npz"),
    ("clip", "hf_disk"),
    ("t5", "jsonl"),
    ("llama", "csv"),
]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name, TASKS) for name, build in BUILDERS.items()}


def config_for(family: Family, fmt: str, root: Path, **overrides: Any) -> dict[str, Any]:
    tasks = []
    for task in TASKS:
        data = write_data(family, task, fmt, root / "data" / task)
        tasks.append(
            {
                "name": task,
                "data": str(data),
                "format": fmt,
                "classes": list(CLASSES),
                "calib_size": 8,
                **family.task_fields.get(task, {}),
            }
        )
    config = {
        "name": f"{family.name}-{fmt}",
        "base": {"path": str(family.base)},
        "experts": [
            {"name": f"expert-{t}", "path": str(family.experts[t]), "task": t} for t in TASKS
        ],
        "tasks": tasks,
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["gptq", "epmq"], "bits": [8], "alpha": 0.1},
        "calibration": {"batch_size": 4},
        "output": {"dir": str(root / "report")},
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(("family_name", "fmt"), CASES)
def test_pipeline_runs_every_family_and_format(
    families: dict[str, Family], family_name: str, fmt: str, tmp_path: Path
) -> None:
    family = families[family_name]
    config = parse_config(config_for(family, fmt, tmp_path))
    lines: list[str] = []
    results, out = run_session(config, progress=False, announce=lines.append)

    assert [r.kind for r in results.rows] == [
        "pretrained", "expert", "merged", "target", "quantized", "quantized",
    ]  # fmt: skip
    # Labels are each expert's own predictions: a data/head/evaluation mix-up shows here.
    assert results.find(kind="expert")[0].accuracy == {t: 1.0 for t in TASKS}
    merged = results.find(kind="merged")[0]
    target = results.find(kind="target")[0]
    for row in results.find(kind="quantized"):
        reference = target if row.quantizer == "epmq" else merged
        # 8-bit rounding barely moves a model: at most two of 16 test examples change.
        assert abs(average(row) - average(reference)) <= 2 / 16, row.name

    saved = load_results(out / "results.json")
    assert saved.settings["workload"]["family"] == family_name
    sizes = saved.settings["workload"]["tasks"]["first"]
    assert (sizes["test"], sizes["format"]) == (16, fmt)
    assert sizes["calib"] == (0 if fmt == "csv" else 8)
    report = (out / "report.md").read_text()
    assert f"{100 * average(merged):.1f}" in report
    assert any("report written" in line for line in lines)


def test_clip_with_linear_head_files(tmp_path: Path) -> None:
    family = BUILDERS["clip"](tmp_path / "clip", TASKS, head_files=True)
    config = parse_config(config_for(family, "npz", tmp_path))
    results, _ = run_session(config, progress=False, announce=lambda _: None)
    assert results.find(kind="expert")[0].accuracy == {t: 1.0 for t in TASKS}


def test_epmq_run_command_line(families: dict[str, Family], tmp_path: Path) -> None:
    config = config_for(families["bert"], "jsonl", tmp_path)
    config["quantization"] = {"methods": ["rtn"], "bits": [4]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = [sys.executable, "-m", "epmq", "run", str(path)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["name"] for r in report["rows"]][:3] == ["pretrained", "experts", "task_arithmetic"]
    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "--force" in again.stderr and "Traceback" not in again.stderr


# -- user mistakes: one line naming the culprit, before any merging ---------------------------
def _copy(folder: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, to))


def _fails(config: dict[str, Any], match: str) -> None:
    with pytest.raises(EpmqError, match=match):
        run_session(parse_config(config), progress=False, announce=lambda _: None)


def test_task_without_data(families: dict[str, Family], tmp_path: Path) -> None:
    config = config_for(families["bert"], "jsonl", tmp_path)
    config["tasks"][1]["data"] = str(tmp_path / "nowhere")
    _fails(config, r"second.*nowhere")


def test_unknown_format_names_the_field(families: dict[str, Family], tmp_path: Path) -> None:
    config = config_for(families["bert"], "jsonl", tmp_path)
    config["tasks"][0]["format"] = "parquet"
    with pytest.raises(EpmqError, match=r"tasks\.0\.format"):
        parse_config(config)


def test_label_outside_the_heads_classes(families: dict[str, Family], tmp_path: Path) -> None:
    config = config_for(families["bert"], "jsonl", tmp_path)
    data = Path(config["tasks"][0]["data"]) / "test.jsonl"
    data.write_text(data.read_text() + json.dumps({"text": "red cat", "label": 3}) + "\n")
    config["tasks"][0]["classes"] = [*CLASSES, "delta"]
    _fails(config, r"task first: label 'delta' \(class 3\) in the test split is outside the 3")


def test_image_size_the_model_cannot_take(families: dict[str, Family], tmp_path: Path) -> None:
    family = families["clip"]
    config = config_for(family, "npz", tmp_path)
    base = _copy(family.base, tmp_path / "base64")
    processor = json.loads((base / "preprocessor_config.json").read_text())
    processor["crop_size"] = {"height": 64, "width": 64}
    processor["size"] = {"shortest_edge": 64}
    (base / "preprocessor_config.json").write_text(json.dumps(processor))
    config["base"]["path"] = str(base)
    _fails(config, r"64.*32")


def test_expert_missing_its_head(families: dict[str, Family], tmp_path: Path) -> None:
    config = config_for(families["bert"], "jsonl", tmp_path)
    expert = _copy(families["bert"].experts["second"], tmp_path / "headless")
    (expert / "head.safetensors").unlink()
    config["experts"][1]["path"] = str(expert)
    _fails(config, r"expert expert-second: no head file .*head\.safetensors")


def test_head_width_differs_from_the_encoder(families: dict[str, Family], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    config = config_for(families["bert"], "jsonl", tmp_path)
    save_file(
        {"weight": torch.zeros(3, 16), "bias": torch.zeros(3)}, str(tmp_path / "h.safetensors")
    )
    config["experts"][0]["head"] = str(tmp_path / "h.safetensors")
    _fails(config, r"expert expert-first: head .*h\.safetensors reads 16 features .* is 32")


def test_user_mistake_on_the_command_line(families: dict[str, Family], tmp_path: Path) -> None:
    config = config_for(families["bert"], "jsonl", tmp_path)
    config["tasks"][0]["data"] = str(tmp_path / "missing")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "epmq", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing" in lines[0], done.stderr


def test_group_size_that_divides_no_layer(families: dict[str, Family], tmp_path: Path) -> None:
    """Caught by --check, and by a run before any model is built, naming file, field, layer."""
    config = config_for(families["bert"], "jsonl", tmp_path)
    config["quantization"] = {"methods": ["rtn"], "bits": [4], "group_sizes": [-1, 7]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    message = (
        f"{path}: quantization.group_sizes 7 does not divide the input width 32 of "
        "encoder.layer.0.attention.self.query; use a divisor of it or -1"
    )
    check = [sys.executable, "-m", "epmq", "run", str(path), "--check"]
    done = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    from epmq.experiment.config import load_config

    lines: list[str] = []
    with pytest.raises(EpmqError, match=re.escape(message)):
        run_session(load_config(path), progress=False, announce=lines.append)
    assert not any("average" in line for line in lines)  # no model was evaluated
    assert not (tmp_path / "report").exists()


def test_quantized_variants_are_exported(families: dict[str, Family], tmp_path: Path) -> None:
    from epmq.experiment.folders import folder_workload

    config = parse_config(
        config_for(
            families["bert"],
            "jsonl",
            tmp_path,
            quantization={"methods": ["gptq", "epmq"], "bits": [4], "evaluate_target": False},
            output={
                "dir": str(tmp_path / "report"),
                "export": ["dequantized", "compressed-tensors"],
            },
        )
    )
    results, out = run_session(config, progress=False, announce=lambda _: None)
    exports = results.settings["exports"]
    assert [(e["variant"], e["format"]) for e in exports] == [
        (name, fmt)
        for name in ("task_arithmetic + gptq w4", "task_arithmetic + epmq w4")
        for fmt in ("dequantized", "compressed-tensors")
    ]
    folder = out / "exports" / "dequantized" / "task_arithmetic-epmq-w4"
    assert (folder / "heads" / "first.safetensors").is_file()
    packed = json.loads((out / exports[3]["folder"] / "config.json").read_text())
    assert packed["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "## Exported checkpoints" in (out / "report.md").read_text()
    # The exported float16 model scores what the table says (float16 may flip a near tie).
    workload = folder_workload(config)
    reloaded = workload.evaluate(workload.load_encoder(folder), workload.heads, list(TASKS))
    row = results.find(kind="quantized", quantizer="epmq")[0]
    for task in TASKS:
        assert abs(reloaded[task] - row.accuracy[task]) <= 1 / 16


def test_image_preprocessing_from_the_config(families: dict[str, Family], tmp_path: Path) -> None:
    from epmq.experiment.folders import folder_workload

    family = families["clip"]
    base = _copy(family.base, tmp_path / "bare")
    (base / "preprocessor_config.json").unlink()
    config = config_for(family, "npz", tmp_path)
    config["base"]["path"] = str(base)
    _fails(config, r"no preprocessor_config\.json.*'image' block")
    config["image"] = {"size": 32, "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    workload = folder_workload(parse_config(config))
    experts = {t: workload.load_encoder(workload.expert_dirs[t]) for t in TASKS}
    # The config's preprocessing equals the processor file's: each expert is exact on its task.
    for task in TASKS:
        assert workload.evaluate(experts[task], workload.heads, [task]) == {task: 1.0}
