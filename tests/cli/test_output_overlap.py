"""``merge``, ``quantize`` and ``eval`` never delete their inputs: an output that is, holds or
lies inside an input is refused with one line naming both (exit 2), even with ``--force``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from epmq.cli import main
from epmq.merging.grams import save_grams

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "red", "big", "small"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONFIG = BertConfig(
    vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
)  # fmt: skip


def tree_digest(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (relative path -> sha256)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A tiny BERT base (with tokenizer), two experts, calibration text and a Grams file."""
    torch.manual_seed(0)
    model = BertModel(CONFIG).eval()
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path / "base")
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"e{i}")
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "topic.txt").write_text("the cat sat on a mat\nthe big red dog\n")
    name = "encoder.layer.0.attention.self.query.weight"
    (tmp_path / "grams").mkdir()
    save_grams(tmp_path / "grams" / "g.safetensors", {name: [torch.eye(32)] * 2})
    return tmp_path


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["epmq", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def _merge(root: Path, out: str) -> list[str]:
    return ["merge", "--base", str(root / "base"), "--expert", str(root / "e0"), "--expert",
            str(root / "e1"), "--method", "regmean", "--grams", str(root / "grams/g.safetensors"),
            "--out", str(root / out), "--force"]  # fmt: skip


def _quantize(root: Path, out: str) -> list[str]:
    return ["quantize", "--model", str(root / "base"), "--method", "epmq", "--bits", "4",
            "--group-size", "-1", "--calib", f"topic={root / 'calib/topic.txt'}", "--expert",
            f"topic={root / 'e0'}", "--calib-size", "2", "--max-length", "8", "--out",
            str(root / out), "--force", "--no-progress"]  # fmt: skip


def _eval(root: Path, out: str) -> list[str]:
    return ["eval", "--suite", "tiny", "--model", str(root / "base"), "--json", str(root / out),
            "--force", "--no-progress"]  # fmt: skip


CASES = [
    (_merge, ".", "contains the base {root}/base"),
    (_merge, "base/merged", "lies inside the base {root}/base"),
    (_merge, "e1", "is the expert {root}/e1"),
    (_merge, "grams", "contains the grams file {root}/grams/g.safetensors"),
    (_quantize, ".", "contains the --model folder {root}/base"),
    (_quantize, "base/q", "lies inside the --model folder {root}/base"),
    (_quantize, "calib", "contains the --calib topic file {root}/calib/topic.txt"),
    (_quantize, "e0", "is the --expert topic folder {root}/e0"),
    (_eval, "base/config.json", "lies inside the --model folder {root}/base"),
]


@pytest.mark.parametrize(("command", "out", "message"), CASES)
def test_output_over_an_input_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys, command, out: str, message: str
) -> None:
    before = tree_digest(root)
    assert _run(command(root, out), monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("epmq: error: output ")
    assert message.format(root=root) in err
    assert tree_digest(root) == before  # nothing deleted, nothing written


@pytest.mark.parametrize("command", [_merge, _quantize])
def test_subprocess_force_into_the_parent_keeps_the_inputs(root: Path, command) -> None:
    before = tree_digest(root)
    done = subprocess.run(
        [sys.executable, "-m", "epmq", *command(root, ".")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"output {root} contains the" in done.stderr
    assert tree_digest(root) == before
