import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epmq import atomic
from epmq.atomic import output_dir, save_tensors, write_json, write_text
from epmq.errors import EpmqError


def test_write_text_refuses_existing_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_text(target, "one", force=False)
    with pytest.raises(EpmqError, match="already exists"):
        write_text(target, "two", force=False)
    write_text(target, "two", force=True)
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_output_dir_is_atomic_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with pytest.raises(RuntimeError), output_dir(target) as partial:
        write_json(partial / "report.json", {"a": 1})
        raise RuntimeError("killed half-way")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_output_dir_replaces_only_with_force(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with output_dir(target) as partial:
        save_tensors(partial / "w.safetensors", {"w": torch.ones(2)})
    assert (target / "w.safetensors").exists()
    with pytest.raises(EpmqError, match="--force"), output_dir(target):
        pass
    with output_dir(target, force=True) as partial:
        write_text(partial / "new.txt", "x")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_written_files_get_the_umask_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not mkstemp's private 0600: the mode open() gives under the process's umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    monkeypatch.setattr(atomic, "_UMASK", 0o002)
    save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(1)})
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o664


def test_output_dir_removes_partial_folders_of_dead_runs(tmp_path: Path) -> None:
    """A run killed by SIGTERM/SIGKILL leaves .<name>.partial-<pid>; the next run removes it,
    but not the folder of a run still going, nor another output's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [f".run.partial-{live.pid}", f".other.partial-{dead.pid}", ".run.partial-x"]
        for name in [f".run.partial-{dead.pid}", *kept]:
            (tmp_path / name).mkdir()
        with output_dir(tmp_path / "run") as partial:
            write_text(partial / "a.txt", "x")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", *kept])
    finally:
        live.kill()
        live.wait()
