from pathlib import Path

import pytest
import torch

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
