"""Fault injection: every kind of input file corrupted in turn, through the command line.

Each case copies the tiny inputs of :mod:`fault_inputs`, corrupts one file (a model's or an
expert's weights, a weight index, ``config.json``, a tokenizer, a head, a config, task or
calibration data) and runs one command on it: it must end with exit code 2 and exactly one line
on stderr naming the file, no traceback, no output written and every input byte for byte as
before. Two cases run as a real process, to see the stderr a user sees (log lines included).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fault_inputs import (
    BASE,
    BIN_INDEX,
    E1,
    E2,
    SAFE,
    SAFE_INDEX,
    Case,
    Outcome,
    assert_one_line,
    bad_json,
    build_inputs,
    command_line,
    copy_inputs,
    digest,
    float8,
    garbage,
    header_bad_json,
    header_huge,
    json_list,
    missing_shard,
    nested_jsonl,
    nested_yaml,
    no_weight_map,
    not_utf8,
    oversized_csv,
    prepare,
    run_cli,
    truncate,
    weight_map_list,
    wrong_offsets,
)  # fmt: skip

import epmq


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_inputs(tmp_path_factory.mktemp("pristine"))


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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_corrupt_input_is_one_line_and_exit_2(
    case: Case, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    root = copy_inputs(pristine, tmp_path)
    out = tmp_path / "out"
    prepare(case, root, out)
    target = root / case.target
    case.corrupt(target)
    before = digest(root)
    outcome = run_cli(command_line(case, root, out), monkeypatch, capsys)
    assert_one_line(outcome, str(root / (case.names or case.target)))
    assert digest(root) == before
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
    root = copy_inputs(pristine, tmp_path)
    out = tmp_path / "out"
    case.corrupt(root / case.target)
    before = digest(root)
    src = str(Path(epmq.__file__).parents[1])  # the epmq under test, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "epmq", *map(str, command_line(case, root, out))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert_one_line(Outcome(done.returncode, done.stderr), str(root / case.target))
    assert digest(root) == before
    assert not out.exists()
