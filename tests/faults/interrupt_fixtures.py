"""Inputs, child processes and content digests for the interrupt tests (``test_interrupts.py``).

The inputs are the tiny BERT family of ``tests/experiment/family_folders.py`` (a base with its
tokenizer, two experts with linear heads, per-task data), plus calibration text for
``epmq quantize``. Each command runs as a child process through ``interrupt_child.py``, which
reports its file events and can be held at one of them to be signalled.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiment"))
from family_folders import BUILDERS, CLASSES, Family, write_data

CHILD = Path(__file__).with_name("interrupt_child.py")
TASKS = ("first", "second")
# Fields that hold wall-clock times or dates (results.json: created, timings, rows' seconds;
# merge_record.json: created; epmq_record.json: seconds per run and layer, resumed_blocks, which
# counts the blocks a resumed run took from its checkpoint): the only ones a resumed run may
# change.
TIMING_FIELDS = frozenset({"created", "timings", "seconds", "resumed_blocks"})
WAIT_S = 300.0  # a child that neither reaches its event nor exits within this is a failure


@dataclass
class Inputs:
    """Everything the three commands read, under one folder (hashed before and after)."""

    root: Path
    family: Family
    calib: dict[str, Path]  # task -> calibration text file
    config: Path  # epmq run config; its output.dir is ``out_dir / "report"``
    out_dir: Path  # the outputs' parent folder (outside ``root``): nothing else may remain there


def build_inputs(root: Path, out_dir: Path) -> Inputs:
    """The tiny BERT family, its data as JSONL, calibration text and an ``epmq run`` config."""
    family = BUILDERS["bert"](root / "bert", TASKS)
    for folder in (family.base, *family.experts.values()):
        _add_pooler(folder)
    calib = {}
    tasks = []
    for task in TASKS:
        data = write_data(family, task, "jsonl", root / "data" / task)
        tasks.append(
            {"name": task, "data": str(data), "format": "jsonl", "classes": list(CLASSES),
             "calib_size": 8}
        )  # fmt: skip
        calib[task] = root / "calib" / f"{task}.txt"
        calib[task].parent.mkdir(parents=True, exist_ok=True)
        calib[task].write_text("\n".join(family.splits[task]["calib"][0]) + "\n")
    config = {
        "name": "faults",
        "base": {"path": str(family.base)},
        "experts": [
            {"name": f"expert-{t}", "path": str(family.experts[t]), "task": t} for t in TASKS
        ],
        "tasks": tasks,
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["rtn", "gptq"], "bits": [8]},
        "calibration": {"batch_size": 4},
        "output": {"dir": str(out_dir / "report"), "export": ["dequantized"]},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return Inputs(root, family, calib, path, out_dir)


def _add_pooler(folder: Path) -> None:
    """Give a BERT folder the pooler it was saved without, the same one in every folder: a
    folder without one loads with a freshly random pooler (issue 17 #4), which would make two
    runs of the same command differ whether interrupted or not."""
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel.from_pretrained(folder).save_pretrained(folder)


def command_args(inputs: Inputs, command: str) -> tuple[list[str], Path, list[str]]:
    """The ``epmq`` arguments of ``command``, its output, and the arguments a rerun adds."""
    family, out = inputs.family, inputs.out_dir / command
    if command == "merge":
        experts = [arg for t in TASKS for arg in ("--expert", str(family.experts[t]))]
        args = ["merge", "--base", str(family.base), *experts, "--method", "ties",
                "--param", "density=0.5", "--out", str(out)]  # fmt: skip
        return args, out, []
    if command == "quantize":
        calib = [arg for t in TASKS for arg in ("--calib", f"{t}={inputs.calib[t]}")]
        experts = [arg for t in TASKS for arg in ("--expert", f"{t}={family.experts[t]}")]
        args = ["quantize", "--model", str(family.base), "--method", "epmq", "--bits", "4",
                "--group-size", "16", *calib, *experts, "--calib-size", "8",
                "--max-length", "16", "--batch-size", "4", "--no-progress", "--resume",
                "--out", str(out)]  # fmt: skip
        return args, out, []
    assert command == "run"
    return ["run", str(inputs.config)], inputs.out_dir / "report", ["--resume"]


@dataclass
class Stopped:
    """A child held at an event and signalled: its exit status and output."""

    event: str
    returncode: int
    stdout: str
    stderr: str


def run_child(args: list[str], events: Path, stop_at: int = -1) -> subprocess.CompletedProcess:
    """Run ``epmq args`` through the event-reporting child to its end."""
    command = [sys.executable, str(CHILD), str(events), str(stop_at), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S)


def stop_child(args: list[str], events: Path, stop_at: int, signum: int) -> Stopped:
    """Run ``epmq args``, hold it at event ``stop_at`` and send it ``signum``."""
    ready = Path(f"{events}.ready")
    command = [sys.executable, str(CHILD), str(events), str(stop_at), *args]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT_S
    while not ready.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not ready.is_file():
        child.kill()
        out, err = child.communicate()
        raise AssertionError(f"never reached event {stop_at} (exit {child.returncode}):\n{err}")
    os.kill(child.pid, signum)
    out, err = child.communicate(timeout=WAIT_S)
    return Stopped(ready.read_text().strip(), child.returncode, out, err)


def message_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that epmq wrote (``epmq: ...``); transformers' progress bars and
    load reports (issue 17 #4, #12) are not the interrupt's business."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("epmq")]


def read_events(events: Path) -> list[str]:
    return events.read_text(encoding="utf-8").splitlines()


def file_digest(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (relative path -> sha256)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def output_digest(root: Path) -> dict[str, str]:
    """Like :func:`file_digest`, with the timing fields of JSON files and of ``report.md``
    left out (the only content two runs of the same command may differ in)."""
    digest = {}
    for name, value in file_digest(root).items():
        path = root / name
        if path.suffix == ".json":
            data = _without_timings(json.loads(path.read_text()))
            value = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        elif path.name == "report.md":
            value = hashlib.sha256(_report_without_timings(path.read_text()).encode()).hexdigest()
        digest[name] = value
    return digest


def _without_timings(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_timings(v) for k, v in data.items() if k not in TIMING_FIELDS}
    if isinstance(data, list):
        return [_without_timings(v) for v in data]
    return data


def _report_without_timings(text: str) -> str:
    """``report.md`` without its ``- created:`` line and its ``### Timings`` table."""
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("### Timings"):
            skipping = True
        elif skipping and line.startswith("#"):
            skipping = False
        if not skipping and not line.startswith("- created:"):
            kept.append(line)
    return "\n".join(kept)


SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
