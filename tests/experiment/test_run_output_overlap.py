"""``epmq run`` never deletes its inputs: an output that is, holds or lies inside the config
file, the base, an expert or a task's data is refused (exit 2, one line), even with force."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from family_folders import write_project

from epmq.errors import EpmqError
from epmq.experiment.config import parse_config
from epmq.experiment.session import run_session

TASKS = ("first", "second")


def tree_digest(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (relative path -> sha256)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's project folder: run.yaml beside the base, experts and data (relative paths),
    and ``link``, a symbolic link to the base."""
    root = tmp_path_factory.mktemp("project")
    write_project(root, TASKS, output={"dir": "report", "force": True})
    os.symlink("base", root / "link")
    return root


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template project for each test."""
    return Path(shutil.copytree(template, tmp_path / "project", symlinks=True))


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (".", "output {root} contains the config file {root}/run.yaml"),
        ("base", "output {root}/base is the base model {root}/base"),
        ("data/first", "output {root}/data/first is the data of task first {root}/data/first"),
        ("data", "output {root}/data contains the data of task first"),
        ("expert_second/run", "lies inside the expert second {root}/expert_second"),
        ("link", "output {root}/link is the base model {root}/base"),
    ],
)
def test_run_refuses_an_output_over_its_inputs(project: Path, out: str, message: str) -> None:
    config = yaml.safe_load((project / "run.yaml").read_text())
    config["output"]["dir"] = out
    path = project / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    before = tree_digest(project)
    done = subprocess.run(
        [sys.executable, "-m", "epmq", "run", str(path), "--force"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert message.format(root=project) in done.stderr
    assert tree_digest(project) == before  # nothing deleted, nothing written


def test_run_session_refuses_the_suite_cache(tmp_path: Path) -> None:
    config = parse_config({"suite": "tiny", "output": {"dir": str(tmp_path), "force": True}})
    with pytest.raises(EpmqError, match=r"contains the suite cache .*cache"):
        run_session(config, cache_dir=tmp_path / "cache", force=True, announce=lambda _: None)
