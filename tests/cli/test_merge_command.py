"""``epmq merge``: a tiny BERT merge end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from epmq.cli import main
from epmq.merging import merge
from epmq.merging.grams import save_grams

CONFIG = BertConfig(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=32,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_models")
    torch.manual_seed(0)
    model = BertModel(CONFIG)
    model.save_pretrained(root / "base")
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / f"expert{i}")
    return {"root": root, "base": root / "base", "e0": root / "expert0", "e1": root / "expert1"}


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["epmq", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def _common(folders: dict[str, Path], out: Path) -> list[str]:
    return [
        "merge", "--base", str(folders["base"]), "--expert", str(folders["e0"]),
        "--expert", str(folders["e1"]), "--out", str(out),
    ]  # fmt: skip


def test_merge_ties_matches_python_api(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "merged"
    params = ["--param", "density=0.2", "--param", "merge_func=sum", "--param", "scale=0.3"]
    argv = [*_common(folders, out), "--method", "ties", *params, "--exclude", "pooler.*"]
    assert _run(argv, monkeypatch) == 0
    assert "wrote" in capsys.readouterr().out
    states = [load_file(folders[k] / "model.safetensors") for k in ("base", "e0", "e1")]
    expected = merge(
        states[0], states[1:], "ties", density=0.2, merge_func="sum", scale=0.3, exclude="pooler.*"
    )
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in expected.items())
    record = json.loads((out / "merge_record.json").read_text())
    assert record["params"]["merge_func"] == "sum" and record["exclude"] == ["pooler.*"]
    BertModel.from_pretrained(out)


def test_regmean_with_grams_file(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "encoder.layer.0.attention.self.query.weight"
    grams = {name: [torch.eye(32) * (i + 1) for i in range(2)]}
    save_grams(tmp_path / "grams.safetensors", grams)
    out = tmp_path / "merged"
    argv = [
        *_common(folders, out),
        "--method",
        "regmean",
        "--grams",
        str(tmp_path / "grams.safetensors"),
    ]
    assert _run(argv, monkeypatch) == 0
    e0, e1 = (load_file(folders[k] / "model.safetensors")[name] for k in ("e0", "e1"))
    written = load_file(out / "model.safetensors")[name]
    assert torch.allclose(written, (e0 + 2 * e1) / 3, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "tie"], "unknown merge method 'tie'; valid methods: average"),
        (["--method", "ties", "--param", "densty=0.2"], "no parameter 'densty'; valid parameters"),
        (["--method", "ties", "--param", "density=lots"], "expects float, got 'lots'"),
        (["--method", "ties", "--param", "density=2"], "'density' must be in"),
        (["--method", "ties", "--include", "vision.*"], "include pattern 'vision.*' matches"),
        (["--method", "regmean"], "needs per-task Gram matrices"),
        (["--method", "average", "--grams", "nope.safetensors"], "grams file nope.safetensors"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
    extra: list[str], message: str,
) -> None:  # fmt: skip
    assert _run([*_common(folders, tmp_path / "m"), *extra], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("epmq: error: ")
    assert message in err
    assert not (tmp_path / "m").exists()


def test_missing_flags_and_existing_output(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert _run(["merge", "--method", "ties"], monkeypatch) == 2
    assert "--base is required" in capsys.readouterr().err
    out = tmp_path / "m"
    out.mkdir()
    assert _run([*_common(folders, out), "--method", "average"], monkeypatch) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert _run([*_common(folders, out), "--method", "average", "--force"], monkeypatch) == 0


def test_subprocess_missing_expert_folder_exits_2(folders: dict[str, Path], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "epmq", "merge", "--base", str(folders["base"]), "--expert",
         str(tmp_path / "missing"), "--method", "average", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "missing does not exist" in result.stderr and "Traceback" not in result.stderr


def test_list_methods(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert _run(["merge", "--list-methods"], monkeypatch) == 0
    text = capsys.readouterr().out
    assert "ties:" in text and "density: float = 0.2" in text and "regmean:" in text
