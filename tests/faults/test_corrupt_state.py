"""Fault injection beyond single input files: a stopped run's resume folder corrupted, a model of
another vocabulary than its tokenizer (``quantize``, ``run``, ``eval``), and a full disk.

Each ends with exit code 2 and one line naming the file or folder, no traceback, nothing
written and every input (the resume folder included) byte for byte as before.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fault_inputs import (
    BASE,
    E1,
    E2,
    QUANTIZE,
    SAFE,
    Case,
    assert_one_line,
    build_inputs,
    command_line,
    copy_inputs,
    digest,
    garbage,
    nested_yaml,
    prepare,
    run_cli,
    run_config,
    truncate,
)  # fmt: skip
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from epmq.cli import main
from epmq.cli.quantize_run import resume_dir


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_inputs(tmp_path_factory.mktemp("pristine"))


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
    (inputs / "run.yaml").write_text(yaml.safe_dump(run_config(inputs, root / "report")))
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


def journal_garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00garbage\n[1]\n")


def journal_not_object(path: Path) -> None:
    path.write_text("[1]\n5\n")


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
    before = digest(root)
    outcome = run_cli(argv, monkeypatch, capsys)
    assert_one_line(outcome, str(matches[0]))
    assert digest(root) == before
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
    root = copy_inputs(pristine, tmp_path)
    out = tmp_path / "out"
    case = Case(command, BASE, shrink_vocabulary)
    prepare(case, root, out)
    for folder in (BASE, E1, E2) if command == "run" else (BASE,):
        shrink_vocabulary(root / folder)
    before = digest(root)
    outcome = run_cli(command_line(case, root, out), monkeypatch, capsys)
    assert_one_line(outcome, f"{root / BASE} has")
    assert "vocabular" in outcome.stderr
    assert digest(root) == before
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
    before = digest(tmp_path) | digest(tiny_suite)
    argv = ["eval", "--suite", "tiny", "--quick", "--cache-dir", tiny_suite, "--model", model,
            "--no-progress", "--json", tmp_path / "acc.json"]  # fmt: skip
    outcome = run_cli(argv, monkeypatch, capsys)
    assert_one_line(outcome, str(model))
    assert digest(tmp_path) | digest(tiny_suite) == before
    assert not (tmp_path / "acc.json").exists()


# -- a full disk -----------------------------------------------------------------------------------
def _disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["merge", "quantize", "run"])
def test_full_disk_is_one_line_and_exit_2(
    command: str, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Every write fails with ENOSPC (``os.fsync``: atomic files, the run's journal)."""
    root = copy_inputs(pristine, tmp_path)
    out = tmp_path / "out"
    case = Case(command, BASE, garbage)
    prepare(case, root, out)
    before = digest(root)
    monkeypatch.setattr(os, "fsync", _disk_full)
    outcome = run_cli(command_line(case, root, out), monkeypatch, capsys)
    assert_one_line(outcome, "No space left on device")
    assert f"cannot write {tmp_path}" in outcome.stderr
    assert digest(root) == before
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))
