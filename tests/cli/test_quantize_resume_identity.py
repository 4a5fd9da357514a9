"""``epmq quantize --resume`` continues only a run on the same inputs and settings.

A stopped run (the export raises, so every block is in the checkpoint) is resumed after one
input or setting changed: the model's weights or an expert's replaced in place, a calibration
file edited, another ``--seed`` or ``--max-length``. Each resume is refused with one line
naming the change and exit code 2, and writes nothing; an unchanged resume ends with the
uninterrupted run's files. A run without ``--resume`` removes a checkpoint left behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast
from transformers.utils import logging as hf_logging

import epmq.export
from epmq.cli import main
from epmq.cli.quantize_run import resume_dir

hf_logging.set_verbosity_error()

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "ran", "on"]
WORDS += ["mat", "log", "big", "red", "old", "and", "a", "very", "fast", "slow", "owl"]
LINES = [" ".join(WORDS[5 + (3 * i + k) % 17] for k in range(3 + i % 5)) for i in range(24)]


def _perturb(folder: Path, seed: int) -> None:
    """Rewrite the model in ``folder`` in place with other weights of the same shapes."""
    model = BertModel.from_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    base, expert = tmp_path / "base", tmp_path / "expert"
    BertModel(config).eval().save_pretrained(base)
    (base / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base)
    shutil.copytree(base, expert)
    _perturb(expert, 1)
    (tmp_path / "topic.txt").write_text("\n".join(LINES[:12]) + "\n")
    (tmp_path / "mood.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in LINES[12:]))
    return {"base": base, "expert": expert, "topic": tmp_path / "topic.txt",
            "mood": tmp_path / "mood.jsonl"}  # fmt: skip


def _argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", str(inputs["base"]), "--method", "epmq", "--bits", "4",
            "--group-size", "-1", "--format", "dequantized", "--out", str(out),
            "--calib", f"topic={inputs['topic']}", "--calib", f"mood={inputs['mood']}",
            "--expert", f"topic={inputs['expert']}", "--expert", f"mood={inputs['base']}",
            "--calib-size", "8", "--max-length", "16", "--no-progress", *extra]  # fmt: skip


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["epmq", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def _stopped(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``argv`` until the export, which is killed: every block is in the checkpoint."""

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed before the export")

    with monkeypatch.context() as patch:
        patch.setattr(epmq.export, "export_checkpoint", killed)
        with pytest.raises(RuntimeError, match="killed"):
            _run(argv, monkeypatch)


def _hashes(folder: Path) -> dict[str, str]:
    """Content hash of every output file but the run record (it holds timings and paths)."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != "epmq_record.json"
    }


def _blocks(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(resume_dir(out).iterdir())}


def test_unchanged_resume_ends_with_the_uninterrupted_files(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    assert _run(_argv(inputs, reference), monkeypatch) == 0
    out = tmp_path / "q"
    _stopped(_argv(inputs, out, "--resume"), monkeypatch)
    assert _run(_argv(inputs, out, "--resume", "--device", "cpu"), monkeypatch) == 0
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["resumed_blocks"] == 2
    assert _hashes(out) == _hashes(reference) and "model.safetensors" in _hashes(out)
    assert not resume_dir(out).exists()


def _edit_line(file: Path) -> None:
    text = file.read_text()
    assert "cat" in text
    file.write_text(text.replace("cat", "owl", 1))


def _nothing(inputs: dict[str, Path]) -> None:
    pass


CHANGES = [
    pytest.param(
        lambda i: _perturb(i["base"], 7), [], "--model folder: model.safetensors changed",
        id="model weights",
    ),
    pytest.param(
        lambda i: _edit_line(i["topic"]), [], "--calib topic file topic.txt changed",
        id="calibration file",
    ),
    pytest.param(
        lambda i: _perturb(i["expert"], 7), [], "--expert topic folder: model.safetensors changed",
        id="expert weights",
    ),
    pytest.param(_nothing, ["--seed", "1"], "--seed 0 → 1", id="seed"),
    pytest.param(_nothing, ["--max-length", "12"], "--max-length 16 → 12", id="max length"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "extra", "message"), CHANGES)
def test_resume_after_a_change_is_refused_naming_it(
    inputs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[dict[str, Path]], None],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "q"
    _stopped(_argv(inputs, out, "--resume"), monkeypatch)
    saved = _blocks(out)
    change(inputs)
    capsys.readouterr()
    assert _run(_argv(inputs, out, "--resume", *extra), monkeypatch) == 2  # the last flag wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("epmq: error: checkpoint ")
    assert message in err
    assert not out.exists() and _blocks(out) == saved  # nothing written


def test_run_without_resume_removes_a_stale_checkpoint(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "q"
    _stopped(_argv(inputs, out, "--resume"), monkeypatch)
    assert resume_dir(out).is_dir()
    _perturb(inputs["base"], 7)
    _stopped(_argv(inputs, out), monkeypatch)  # a fresh run, stopped too: no blocks survive
    assert not resume_dir(out).exists()
    assert _run(_argv(inputs, out, "--resume"), monkeypatch) == 0
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["resumed_blocks"] == 0


def test_a_foreign_folder_in_place_of_the_checkpoint_is_not_deleted(
    inputs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "q"
    resume_dir(out).mkdir()
    (resume_dir(out) / "notes.txt").write_text("mine")
    assert _run(_argv(inputs, out), monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an epmq block checkpoint" in err
    assert (resume_dir(out) / "notes.txt").read_text() == "mine" and not out.exists()
