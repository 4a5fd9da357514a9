"""Fault injection: every kind of input file corrupted in turn, through the command line.

A tiny BERT base, two experts (with their heads and tokenizers) and two tasks' data are built
once; each case copies them, corrupts one file, runs one ``epmq`` command in-process through
:func:`epmq.cli.main`, and checks what the README promises: exit code 2, exactly one line on
stderr naming the file (or tensor, or field), no traceback, no output written and every input
byte for byte as before. A few cases also run as a real subprocess, to see the stderr a user
sees (warnings included).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import epmq
from epmq.cli import main
from epmq.cli.quantize_command import resume_dir
from experiment.family_folders import CLASSES, build_bert, write_data

TASKS = ("first", "second")
QUANTIZE = ["--method", "gptq", "--bits", "4", "--group-size", "16", "--calib-size", "4",
            "--max-length", "12", "--no-progress"]  # fmt: skip


# -- the pristine inputs, built once ----------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
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


def _digest(root: Path) -> dict[str, str]:
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


def journal_garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00garbage\n[1]\n")


def journal_not_object(path: Path) -> None:
    path.write_text("[1]\n5\n")


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
    # transformers' progress bars are silenced by issue 17's item 12 elsewhere, not here
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


BASE, E1, E2 = "base", "expert_first", "expert_second"
SAFE = "model.safetensors"
BIN_INDEX = "expert_bin/pytorch_model.bin.index.json"
SAFE_INDEX = "expert_sharded/model.safetensors.index.json"
CASES = [
    *(Case("merge", f"{BASE}/{SAFE}", c) for c in (truncate, garbage, header_bad_json)),
    *(Case("merge", f"{E2}/{SAFE}", c) for c in (header_huge, wrong_offsets, float8)),
    Case("merge", f"{BASE}/config.json", garbage),
    *(Case("merge-sharded", SAFE_INDEX, c) for c in (bad_json, no_weight_map, weight_map_list)),
    Case("merge-sharded", SAFE_INDEX, missing_shard),
    Case("merge-sharded", "expert_sharded/model-00002-of-00002.safetensors", truncate),
    *(Case("merge-bin", BIN_INDEX, c) for c in (bad_json, no_weight_map, weight_map_list)),
    Case("merge-bin", BIN_INDEX, missing_shard),
    Case("merge-bin", "expert_bin/pytorch_model-00001-of-00002.bin", garbage),
    *(Case("quantize", f"{BASE}/{SAFE}", c) for c in (truncate, garbage, wrong_offsets)),
    Case("quantize", f"{BASE}/config.json", garbage),
    Case("quantize", f"{BASE}/config.json", json_list),
    Case("quantize", f"{BASE}/tokenizer.json", garbage, names=BASE),
    Case("quantize", "data/first/train.jsonl", nested_jsonl),
    Case("quantize-csv", "calib.csv", oversized_csv),
    *(Case("quantize-epmq", f"{E1}/{SAFE}", c) for c in (truncate, wrong_offsets, float8)),
    Case("run", "run.yaml", not_utf8),
    Case("run", "run.yaml", nested_yaml),
    Case("run", "data/second/test.jsonl", nested_jsonl),
    Case("run", "data/first/test.jsonl", not_utf8),
    Case("run", f"{E1}/head.safetensors", garbage),
    Case("run", f"{E2}/{SAFE}", truncate),
    Case("run", f"{BASE}/{SAFE}", wrong_offsets),
    Case("run-csv", "csvdata/test.csv", oversized_csv),
]


def _inputs(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "in"
    shutil.copytree(pristine, root)
    return root


def _run_config(root: Path, out: Path, data_format: str = "jsonl") -> dict[str, Any]:
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


def _argv(case: Case, root: Path, out: Path) -> list[str]:
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


def _prepare(case: Case, root: Path, out: Path) -> None:
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
        (root / "run.yaml").write_text(yaml.safe_dump(_run_config(root, out, fmt)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_corrupt_input_is_one_line_and_exit_2(
    case: Case, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    root = _inputs(pristine, tmp_path)
    out = tmp_path / "out"
    _prepare(case, root, out)
    target = root / case.target
    case.corrupt(target)
    before = _digest(root)
    outcome = run_cli(_argv(case, root, out), monkeypatch, capsys)
    assert_one_line(outcome, str(root / (case.names or case.target)))
    assert _digest(root) == before
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


# -- a stopped run's resume folder, corrupted ---------------------------------------------------
class Stop(Exception):
    pass


def stop(command: str, root: Path) -> list[str]:
    """Stop ``quantize --resume`` after its first block, or ``run`` after its journal's first
    line, on the inputs in ``root / "in"``; returns the command that resumes it. The stopped
    state is built where it is resumed: a copy elsewhere would change the runs' fingerprints."""
    from epmq.calib.checkpoint import BlockCheckpoint
    from epmq.experiment import session

    inputs = root / "in"
    (inputs / "run.yaml").write_text(yaml.safe_dump(_run_config(inputs, root / "report")))
    if command == "run":
        argv = ["run", inputs / "run.yaml", "--resume"]
    else:
        argv = ["quantize", "--model", inputs / BASE, "--out", root / "out", "--resume",
                *QUANTIZE, "--calib", f"first={inputs / 'data/first/train.jsonl'}"]  # fmt: skip
    save = BlockCheckpoint.save

    def save_then_stop(self: BlockCheckpoint, *args: Any, **kwargs: Any) -> None:
        save(self, *args, **kwargs)
        raise Stop

    def stop_now(*args: Any, **kwargs: Any) -> None:
        raise Stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockCheckpoint, "save", save_then_stop)
        patch.setattr(session, "run_experiment", stop_now)
        patch.setattr(sys, "argv", ["epmq", *map(str, argv)])
        with pytest.raises(Stop):
            main()
    return argv


def block_metadata_garbage(path: Path) -> None:
    save_file(load_file(path), str(path), metadata={"results": "{not json", "records": "[]"})


def block_tensor_missing(path: Path) -> None:
    state = load_file(path)
    name = next(k for k in sorted(state) if k.endswith("::codes"))
    del state[name]
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(state, str(path), metadata=metadata)


def journal_bad_entry(path: Path) -> None:
    path.write_text(path.read_text() + '[1, 2]\n{"key": "x"}\n')


def journal_entry_not_a_row(path: Path) -> None:
    path.write_text(path.read_text() + '{"key": ["x"], "row": {}}\n{"key": "x"}\n')


RESUME_CASES = [
    ("quantize", ".out.resume/meta.json", garbage),
    ("quantize", ".out.resume/meta.json", nested_yaml),
    ("quantize", ".out.resume/*-block-0000.safetensors", truncate),
    ("quantize", ".out.resume/*-block-0000.safetensors", block_metadata_garbage),
    ("quantize", ".out.resume/*-block-0000.safetensors", block_tensor_missing),
    ("run", ".report.partial/journal.jsonl", journal_garbage),
    ("run", ".report.partial/journal.jsonl", journal_not_object),
    ("run", ".report.partial/journal.jsonl", journal_bad_entry),
    ("run", ".report.partial/journal.jsonl", journal_entry_not_a_row),
]


@pytest.mark.parametrize(
    ("command", "target", "corrupt"),
    RESUME_CASES,
    ids=[f"{c[1]}:{c[2].__name__}" for c in RESUME_CASES],
)
def test_corrupt_resume_folder_is_one_line_and_exit_2(
    command: str,
    target: str,
    corrupt: Callable[[Path], None],
    pristine: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    root = tmp_path / "s"
    shutil.copytree(pristine, root / "in")
    argv = stop(command, root)
    matches = sorted(root.glob(target))
    assert matches, target
    corrupt(matches[0])
    before = _digest(root)
    outcome = run_cli(argv, monkeypatch, capsys)
    assert_one_line(outcome, str(matches[0]))
    assert _digest(root) == before
    assert not (root / "out").exists() and not (root / "report").exists()
    if command == "quantize":
        assert (resume_dir(root / "out") / "meta.json").is_file()


# -- a model of another vocabulary ---------------------------------------------------------------
def shrink_vocabulary(folder: Path, rows: int = 20) -> None:
    """Cut the word embeddings to ``rows`` (below the tokenizer's size) in the weights and the
    config: a model of another vocabulary, whose forward on the tokenizer's ids would fail."""
    state = load_file(folder / SAFE)
    name = next(n for n in state if n.endswith("word_embeddings.weight"))
    state[name] = state[name][:rows].clone()
    save_file(state, str(folder / SAFE), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))


@pytest.mark.parametrize("command", ["quantize", "run"])
def test_model_of_another_vocabulary_is_one_line_and_exit_2(
    command: str, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    root = _inputs(pristine, tmp_path)
    out = tmp_path / "out"
    case = Case(command, BASE, shrink_vocabulary)
    _prepare(case, root, out)
    for folder in (BASE, E1, E2) if command == "run" else (BASE,):
        shrink_vocabulary(root / folder)
    before = _digest(root)
    outcome = run_cli(_argv(case, root, out), monkeypatch, capsys)
    assert_one_line(outcome, f"{root / BASE} has")
    assert "vocabular" in outcome.stderr
    assert _digest(root) == before
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny suite's cache (its experts trained once)."""
    from epmq.suites import get_suite

    cache = tmp_path_factory.mktemp("suite_cache")
    get_suite("tiny", cache_dir=cache, quick=True).prepare(progress=False)
    return cache


@pytest.mark.parametrize("corrupt", [shrink_vocabulary, truncate], ids=lambda c: c.__name__)
def test_eval_of_a_broken_model_is_one_line_and_exit_2(
    corrupt: Callable[[Path], None],
    tiny_suite: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    from epmq.suites import get_suite

    model = tmp_path / "model"
    shutil.copytree(get_suite("tiny", cache_dir=tiny_suite, quick=True).base_dir, model)
    corrupt(model if corrupt is shrink_vocabulary else model / SAFE)
    before = _digest(tmp_path) | _digest(tiny_suite)
    argv = ["eval", "--suite", "tiny", "--quick", "--cache-dir", tiny_suite, "--model", model,
            "--no-progress", "--json", tmp_path / "acc.json"]  # fmt: skip
    outcome = run_cli(argv, monkeypatch, capsys)
    assert_one_line(outcome, str(model))
    assert _digest(tmp_path) | _digest(tiny_suite) == before
    assert not (tmp_path / "acc.json").exists()


# -- a full disk -----------------------------------------------------------------------------------
def _disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["merge", "quantize", "run"])
def test_full_disk_is_one_line_and_exit_2(
    command: str, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Every write fails with ENOSPC (``os.fsync``: atomic files, the run's journal)."""
    root = _inputs(pristine, tmp_path)
    out = tmp_path / "out"
    case = Case(command, BASE, garbage)
    _prepare(case, root, out)
    before = _digest(root)
    monkeypatch.setattr(os, "fsync", _disk_full)
    outcome = run_cli(_argv(case, root, out), monkeypatch, capsys)
    assert_one_line(outcome, "No space left on device")
    assert f"cannot write {tmp_path}" in outcome.stderr
    assert _digest(root) == before
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


# -- what a user sees: a real process ------------------------------------------------------------
@pytest.mark.parametrize(
    "case", [CASES[0], next(c for c in CASES if c.command == "merge-bin" and "00001" in c.target)],
    ids=lambda c: c.id,
)  # fmt: skip
def test_subprocess_prints_one_line_and_no_traceback(
    case: Case, pristine: Path, tmp_path: Path
) -> None:
    root = _inputs(pristine, tmp_path)
    out = tmp_path / "out"
    case.corrupt(root / case.target)
    before = _digest(root)
    src = str(Path(epmq.__file__).parents[1])  # the epmq under test, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "epmq", *map(str, _argv(case, root, out))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert_one_line(Outcome(done.returncode, done.stderr), str(root / case.target))
    assert _digest(root) == before
    assert not out.exists()
