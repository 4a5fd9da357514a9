"""``epmq run`` under ``torchrun``: two gloo ranks share the calibration data and give the
same models (and so the same report) as one process; rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from family_folders import write_project
from safetensors.torch import load_file

from epmq.eval.results import Row, SweepPoint
from epmq.experiment.journal import Journal
from epmq.experiment.ranks import RankJournal, share_journal

TASKS = ("first", "second")


def _launch(root: Path, ranks: int, out: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "epmq", "run", "run.yaml"]
    if ranks > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(ranks), "-m"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = (root / "run.yaml").read_text().replace("dir: report", f"dir: {out}")
    (root / "run.yaml").write_text(config)
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    (root / "run.yaml").write_text(config.replace(f"dir: {out}", "dir: report"))
    return done


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        TASKS,
        merges=[{"method": "task_arithmetic", "params": {"scale": 0.5}}, {"method": "regmean"}],
        quantization={"methods": ["gptq", "epmq"], "bits": [4], "group_sizes": [16]},
        calibration={"batch_size": 2},
        output={"dir": "report", "export": ["compressed-tensors"]},
    )
    one = _launch(tmp_path, 1, "one")
    assert one.returncode == 0, one.stderr
    two = _launch(tmp_path, 2, "two")
    assert two.returncode == 0, two.stderr
    assert "calibrating on 2 ranks" in two.stdout
    assert two.stdout.count("report written to") == 1  # rank 0 alone reports

    def rows(out: str) -> dict[str, dict[str, float]]:
        data = json.loads((tmp_path / out / "results.json").read_text())
        return {row["name"]: row["accuracy"] for row in data["rows"]}

    assert rows("two") == rows("one")
    exports = sorted(
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors")
    )
    assert exports and exports == sorted(
        p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.safetensors")
    )
    for path in exports:
        want, got = load_file(str(tmp_path / "one" / path)), load_file(str(tmp_path / "two" / path))
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            if value.is_floating_point():
                torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
            else:
                assert torch.equal(got[key], value), f"{path}: {key}"


@pytest.fixture
def one_rank_group(tmp_path: Path):  # type: ignore[no-untyped-def]
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    yield
    dist.destroy_process_group()


def test_rank_journal_holds_rank0s_models_and_writes_nothing(
    tmp_path: Path, one_rank_group: None
) -> None:
    journal = Journal(tmp_path, {"settings": 1}, resume=False)
    journal.add_row("a", Row(name="a", kind="merged", merge="ties", accuracy={"t": 0.5}))
    journal.add_point(
        "p", SweepPoint(merge="ties", quantizer="epmq", params={"alpha": 1.0}, average=0.25)
    )
    assert share_journal(journal, 0) is journal
    mirror = RankJournal(journal.rows, journal.points)
    assert mirror.has("a") and mirror.has("p") and not mirror.has("b")
    mirror.add_row("b", Row(name="b", kind="merged", merge="ties", accuracy={"t": 1.0}))
    assert mirror.has("b") and not journal.has("b")
    assert len(journal.path.read_text().splitlines()) == 3  # fingerprint + two models
