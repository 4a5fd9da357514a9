"""Input identities (:mod:`epmq.identity`): what tells two inputs apart, and how a changed
fingerprint is described."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import epmq.identity
from epmq.identity import describe_changes, file_identity, input_identities, path_identity


def test_small_files_are_told_apart_by_content_not_by_time(tmp_path: Path) -> None:
    file = tmp_path / "qa.jsonl"
    file.write_text('{"text": "a"}\n')
    before = file_identity(file)
    os.utime(file, ns=(1, 1))
    assert file_identity(file) == before  # a copy with another time is the same input
    file.write_text('{"text": "b"}\n')
    after = file_identity(file)
    assert after["size"] == before["size"] and after["sha256"] != before["sha256"]
    assert after["path"] == str(file.resolve())


def test_large_safetensors_are_told_apart_by_header_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(epmq.identity, "FULL_HASH_BYTES", 16)
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(file))
    os.utime(file, ns=(10**18, 10**18))
    first = file_identity(file)
    assert "header_sha256" in first and "sha256" not in first
    save_file({"w": torch.ones(4, 4)}, str(file))  # same header, other values
    os.utime(file, ns=(10**18, 10**18))
    assert file_identity(file) == first  # only the time tells a same-shaped rewrite apart
    os.utime(file, ns=(10**18 + 1, 10**18 + 1))
    assert file_identity(file) != first
    save_file({"w": torch.ones(4, 5)}, str(file))
    os.utime(file, ns=(10**18, 10**18))
    assert file_identity(file)["header_sha256"] != first["header_sha256"]


def test_large_other_files_hash_their_first_and_last_mib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(epmq.identity, "FULL_HASH_BYTES", 16)
    monkeypatch.setattr(epmq.identity, "EDGE_BYTES", 8)
    file = tmp_path / "weights.bin"
    file.write_bytes(bytes(range(64)))
    os.utime(file, ns=(5, 5))
    first = file_identity(file)
    file.write_bytes(bytes(range(63)) + b"\xff")  # the last byte differs
    os.utime(file, ns=(5, 5))
    assert file_identity(file)["edges_sha256"] != first["edges_sha256"]


def test_folder_identity_lists_every_file_but_hidden_ones(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "train").mkdir()
    (tmp_path / "model" / "train" / "a.png").write_bytes(b"png")
    (tmp_path / "model" / ".git").mkdir()
    (tmp_path / "model" / ".git" / "HEAD").write_text("ref")
    (tmp_path / "model" / ".cache").write_text("x")
    found = path_identity(tmp_path / "model")
    assert found["kind"] == "folder" and sorted(found["files"]) == ["config.json", "train/a.png"]
    assert path_identity(tmp_path / "none") == {"kind": "missing", "path": str(tmp_path / "none")}


def test_changes_are_named_by_dotted_path_and_input(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"1")
    (tmp_path / "qa.jsonl").write_text("a\n")
    inputs = [("--model folder", tmp_path / "m"), ("--calib qa file", tmp_path / "qa.jsonl")]
    old = {"grid": {"bits": 4}, "max_length": 128, **input_identities(inputs)}
    (tmp_path / "m" / "model.safetensors").write_bytes(b"2")
    (tmp_path / "m" / "extra.json").write_text("{}")
    (tmp_path / "qa.jsonl").write_text("b\n")
    new = {"grid": {"bits": 3}, "max_length": 64, **input_identities(inputs)}
    assert describe_changes(old, new, limit=10) == (
        "grid.bits 4 → 3; max_length 128 → 64; --model folder: extra.json added; "
        "--model folder: model.safetensors changed; --calib qa file qa.jsonl changed"
    )
    assert describe_changes(old, new, limit=2).endswith("max_length 128 → 64; and 3 more")
    (tmp_path / "qa.jsonl").unlink()
    gone = input_identities(inputs)["--calib qa file"]
    assert describe_changes({"f": old["--calib qa file"]}, {"f": gone}).endswith("is missing")
    moved = path_identity(tmp_path / "m")
    moved["path"] = "/elsewhere/m"
    assert "moved:" in describe_changes({"m": path_identity(tmp_path / "m")}, {"m": moved})
    assert describe_changes({"a": 1}, {"b": 1}) == "a removed; b added"
