"""The fault-injection harness: tiny inputs on disk, ways to corrupt a file, the commands that
read them, and the checks every case makes.

:func:`build_inputs` writes a tiny BERT base, two experts (with their heads and tokenizers),
the first expert again as sharded pickled ``.bin`` weights, the second as sharded safetensors,
and two tasks' data. A case copies them, corrupts one file, runs one ``epmq`` command
in-process through :func:`epmq.cli.main` (:func:`run_cli`: any exception but ``SystemExit``
is a traceback and fails) and checks what the README promises (:func:`assert_one_line`): exit
code 2 and exactly one line on stderr that names the file, tensor or field.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from epmq.cli import main
from experiment.family_folders import CLASSES, build_bert, write_data

TASKS = ("first", "second")
QUANTIZE = ["--method", "gptq", "--bits", "4", "--group-size", "16", "--calib-size", "4",
            "--max-length", "12", "--no-progress"]  # fmt: skip


BASE, E1, E2 = "base", "expert_first", "expert_second"
SAFE = "model.safetensors"
BIN_INDEX = "expert_bin/pytorch_model.bin.index.json"
SAFE_INDEX = "expert_sharded/model.safetensors.index.json"


# -- the pristine inputs ----------------------------------------------------------------------
def build_inputs(root: Path) -> Path:
    """The pristine inputs under ``root`` (see the module docstring)."""
    family = build_bert(root, TASKS)
    for task in TASKS:
        write_data(family, task, "jsonl", root / "data" / task)
    bin_expert = root / "expert_bin"  # the first expert as pickled, sharded .bin weights
    bin_expert.mkdir()
    state = load_file(family.experts["first"] / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half],
              "pytorch_model-00002-of-00002.bin": names[half:]}  # fmt: skip
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, bin_expert / file)
    shutil.copy(family.experts["first"] / "config.json", bin_expert / "config.json")
    _write_index(bin_expert / "pytorch_model.bin.index.json", shards)
    sharded = root / "expert_sharded"  # the second expert as sharded safetensors
    sharded.mkdir()
    state = load_file(family.experts["second"] / "model.safetensors")
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}  # fmt: skip
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    shutil.copy(family.experts["second"] / "config.json", sharded / "config.json")
    _write_index(sharded / "model.safetensors.index.json", shards)
    return root


def _write_index(path: Path, shards: dict[str, list[str]]) -> None:
    weight_map = {name: file for file, names in shards.items() for name in names}
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- corruptions ------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def header_bad_json(path: Path) -> None:
    body = b'{"weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # no closing }
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)


def header_huge(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 1 << 40) + path.read_bytes()[8:])


def wrong_offsets(path: Path) -> None:
    """A well-formed header whose tensors' data runs past the end of the file."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    end = 0
    for name, info in header.items():
        if name != "__metadata__":
            end = max(end, info["data_offsets"][1])
    path.write_bytes(data[:8] + data[8 : 8 + size] + body[: end // 2])


def float8(path: Path) -> None:
    state = load_file(path)
    name = next(n for n in sorted(state) if n.endswith("query.weight"))
    state[name] = state[name].to(torch.float8_e4m3fn)
    save_file(state, str(path), metadata={"format": "pt"})


def bad_json(path: Path) -> None:
    path.write_text('{"weight_map": {"a": ')


def no_weight_map(path: Path) -> None:
    path.write_text(json.dumps({"metadata": {}}))


def weight_map_list(path: Path) -> None:
    path.write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def missing_shard(path: Path) -> None:
    index = json.loads(path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "shard-that-is-not-there.bin"
    path.write_text(json.dumps(index))


def not_utf8(path: Path) -> None:
    path.write_bytes(b"name: caf\xe9\n" + path.read_bytes())


def json_list(path: Path) -> None:
    path.write_text("[1, 2, 3]")


def nested_jsonl(path: Path) -> None:
    depth = 100_000
    line = '{"text": ' + "[" * depth + "]" * depth + ', "label": 0}'
    path.write_text(path.read_text() + line + "\n")


def nested_yaml(path: Path) -> None:
    path.write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")


def oversized_csv(path: Path) -> None:
    path.write_text("text,label\n" + "word " * 40_000 + ",alpha\nred cat,beta\n")


# -- running the command line in-process --------------------------------------------------------
@dataclass
class Outcome:
    code: int
    stderr: str


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> Outcome:
    """``epmq argv`` in this process; a traceback (any exception but SystemExit) fails."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["epmq", *map(str, argv)])
    try:
        main()
    except SystemExit as stop:
        code = int(stop.code or 0) if not isinstance(stop.code, str) else 1
    except BaseException as exc:  # what a user would see as a traceback
        pytest.fail(f"traceback: {type(exc).__name__}: {exc}"[:2000])
    else:
        code = 0
    return Outcome(code, capsys.readouterr().err)


PROGRESS_BAR = re.compile(r"\d+%\|")


def assert_one_line(outcome: Outcome, names: str) -> None:
    """Exit code 2 and one ``epmq: error:`` line on stderr holding ``names``, no traceback.
    (transformers' progress bars are silenced by issue 17's item 12, not here: skipped.)"""
    lines = [x for x in outcome.stderr.splitlines() if x.strip() and not PROGRESS_BAR.search(x)]
    assert outcome.code == 2, outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("epmq: error: ")
    assert "Traceback" not in outcome.stderr
    assert names in lines[0], f"{names!r} not named in: {lines[0]}"


@dataclass(frozen=True)
class Case:
    """One corrupted file: ``target`` relative to the inputs' root, and the command."""

    command: str  # merge, quantize, quantize-epmq, run
    target: str
    corrupt: Callable[[Path], None]
    names: str | None = None  # the path the line must name, relative (default: target)

    @property
    def id(self) -> str:
        return f"{self.command}:{self.target}:{self.corrupt.__name__}"


def copy_inputs(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine inputs in ``tmp_path / "in"``."""
    root = tmp_path / "in"
    shutil.copytree(pristine, root)
    return root


def run_config(root: Path, out: Path, data_format: str = "jsonl") -> dict[str, Any]:
    """An ``epmq run`` config over the inputs in ``root`` (RTN only: the cheapest run)."""
    tasks = []
    for task in TASKS:
        data = root / "data" / task if data_format == "jsonl" else root / "csvdata"
        tasks.append({"name": task, "data": str(data), "format": data_format,
                      "classes": list(CLASSES), "calib_size": 4})  # fmt: skip
    return {
        "name": "faults",
        "base": {"path": str(root / BASE)},
        "experts": [
            {"name": f"expert-{t}", "path": str(root / f"expert_{t}"), "task": t} for t in TASKS
        ],
        "tasks": tasks,
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["rtn"], "bits": [4]},
        "calibration": {"batch_size": 4},
        "output": {"dir": str(out)},
    }


def command_line(case: Case, root: Path, out: Path) -> list[str]:
    """The command a case runs on the inputs in ``root``, writing ``out``."""
    if case.command.startswith("merge"):
        experts = {"merge": [E1, E2], "merge-sharded": [E1, "expert_sharded"],
                   "merge-bin": ["expert_bin", E2]}[case.command]  # fmt: skip
        return ["merge", "--method", "task_arithmetic", "--base", root / BASE, "--expert",
                root / experts[0], "--expert", root / experts[1], "--out", out]  # fmt: skip
    if case.command.startswith("quantize"):
        calib = [f"first={root / 'data/first/train.jsonl'}"]
        if case.command == "quantize-csv":
            calib = [f"first={root / 'calib.csv'}"]
        argv = ["quantize", "--model", root / BASE, "--out", out, *QUANTIZE]
        argv += [x for c in calib for x in ("--calib", c)]
        if case.command == "quantize-epmq":
            argv[argv.index("gptq")] = "epmq"
            argv += ["--expert", f"first={root / E1}"]
        return argv
    return ["run", root / "run.yaml"]


def prepare(case: Case, root: Path, out: Path) -> None:
    """Write what the case's command needs beyond the pristine inputs (a config, CSV data)."""
    if case.command == "quantize-csv":
        (root / "calib.csv").write_text("text,label\nred cat,alpha\n")
    if case.command.startswith("run"):
        fmt = "csv" if case.command == "run-csv" else "jsonl"
        if fmt == "csv":
            (root / "csvdata").mkdir()
            for split in ("train", "test"):
                (root / "csvdata" / f"{split}.csv").write_text(
                    "text,label\nred cat,alpha\nblue dog,beta\nsun,gamma\n"
                )
        (root / "run.yaml").write_text(yaml.safe_dump(run_config(root, out, fmt)))
