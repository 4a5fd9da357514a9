"""Model folders through the command line: no random weights, no added modules, one line.

``epmq quantize`` of a BERT folder saved without a pooler exports exactly the source's tensors
(no random pooler); a folder missing a tensor makes ``quantize`` and ``eval`` exit 2 with one
line on stderr (no transformers progress bar or load report around it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from epmq.cli import main

WORDS = ["the", "a", "cat", "dog", "owl", "fox", "red", "blue", "big", "small", "is", "was"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: compressed-tensors fields that stand for a quantized linear's ``weight``
PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("load_errors")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = root / "model"
    BertModel(config, add_pooling_layer=False).eval().save_pretrained(model)
    (model / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(model / "vocab.txt")).save_pretrained(model)
    sentences = [" ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(4)) for i in range(12)]
    (root / "calib.txt").write_text("\n".join(sentences) + "\n")
    broken = root / "broken"
    broken.mkdir()
    for file in model.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["encoder.layer.0.output.dense.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return root


def _names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def _unpacked(names: set[str]) -> set[str]:
    """Tensor names with a compressed-tensors linear's fields folded back into ``weight``."""
    out = set()
    for name in names:
        module, _, field = name.rpartition(".")
        out.add(f"{module}.weight" if field in PACKED else name)
    return out


def _quantize_argv(model: Path, out: Path, fmt: str, calib: Path) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "rtn", "--bits", "4",
            "--group-size", "16", "--format", fmt, "--out", str(out), "--calib",
            f"t={calib}", "--calib-size", "4", "--max-length", "8", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("fmt", ["dequantized", "compressed-tensors"])
def test_export_holds_exactly_the_sources_tensors(
    root: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    out = tmp_path / "q"
    argv = _quantize_argv(root / "model", out, fmt, root / "calib.txt")
    monkeypatch.setattr(sys, "argv", ["epmq", *argv])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    source = _names(root / "model")
    assert not any("pooler" in name for name in source)
    assert _unpacked(_names(out)) == source


def _epmq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epmq", *args], capture_output=True, text=True, timeout=300
    )


def _one_line_naming_the_tensor(done: subprocess.CompletedProcess[str], folder: Path) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("epmq: error: ") and str(folder) in lines[0]
    assert "encoder.layer.0.output.dense.weight" in lines[0]


def test_quantize_of_a_folder_missing_a_tensor_exits_2_with_one_line(
    root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q"
    done = _epmq(*_quantize_argv(root / "broken", out, "dequantized", root / "calib.txt"))
    _one_line_naming_the_tensor(done, root / "broken")
    assert not out.exists()


def test_eval_of_a_folder_missing_a_tensor_exits_2_with_one_line(
    root: Path, tmp_path: Path
) -> None:
    done = _epmq(
        "eval", "--suite", "tiny", "--quick", "--model", str(root / "broken"),
        "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu",
    )  # fmt: skip
    _one_line_naming_the_tensor(done, root / "broken")
