"""A block checkpoint is fingerprinted by the engine's settings and the caller's identity;
another fingerprint is refused naming what changed; a stale checkpoint can be removed, a
foreign folder cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from epmq.calib.checkpoint import BlockCheckpoint, remove_checkpoint
from epmq.errors import EpmqError

SETTINGS = {"method": "gptq", "grid": {"bits": 4, "group_size": 128}, "tasks": {"qa": 2}}


def test_another_identity_or_setting_is_refused_naming_it(tmp_path: Path) -> None:
    BlockCheckpoint(tmp_path, SETTINGS, {"--seed": 0})
    BlockCheckpoint(tmp_path, SETTINGS, {"--seed": 0})  # the same run resumes
    with pytest.raises(EpmqError, match="other settings or inputs \\(--seed 0 → 1\\)"):
        BlockCheckpoint(tmp_path, SETTINGS, {"--seed": 1})
    grid = {**SETTINGS, "grid": {"bits": 3, "group_size": 128}}
    with pytest.raises(EpmqError, match=r"grid\.bits 4 → 3"):
        BlockCheckpoint(tmp_path, grid, {"--seed": 0})


def test_unreadable_meta_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_bytes(b"\xff{")
    with pytest.raises(EpmqError, match=r"meta\.json: not valid JSON"):
        BlockCheckpoint(tmp_path, SETTINGS)


def test_remove_checkpoint_takes_checkpoints_only(tmp_path: Path) -> None:
    folder = tmp_path / ".q.resume"
    for rank in ("rank0", "rank1"):
        (folder / rank).mkdir(parents=True)
        (folder / rank / "meta.json").write_text("{}")
        (folder / rank / "layers-block-0000.safetensors").write_bytes(b"")
    (folder / "rank1" / ".layers-block-0001.safetensors.x1.tmp").write_bytes(b"")
    remove_checkpoint(folder)
    assert not folder.exists()
    remove_checkpoint(folder)  # nothing to remove
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    (folder / "results.csv").write_text("mine")
    with pytest.raises(EpmqError, match="is not an epmq block checkpoint"):
        remove_checkpoint(folder)
    assert (folder / "results.csv").read_text() == "mine"
