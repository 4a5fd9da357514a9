"""``epmq quantize --task-weights``: auto weights from the experts' distances reach the solve
(the same model as the Python API with those weights); bad values exit 2 with one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast
from transformers.utils import logging as hf_logging

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.text_data import load_calibration, load_tokenizer, model_input_names
from epmq.cli import main
from epmq.models.registry import load_model
from epmq.quant import QuantGrid

hf_logging.set_verbosity_error()

WORDS = ["the", "a", "cat", "dog", "owl", "fox", "bread", "soup", "good", "bad", "is", "was"]
SENTENCES = [
    " ".join(WORDS[(5 * i + 3 * k) % len(WORDS)] for k in range(3 + i % 5)) for i in range(24)
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT, expert ``near`` = the model itself, expert ``far`` = strongly perturbed."""
    root = tmp_path_factory.mktemp("task_weights_cli")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = BertModel(config).eval()
    model.save_pretrained(root / "bert")
    (root / "bert" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n"
    )
    BertTokenizerFast(vocab_file=str(root / "bert" / "vocab.txt")).save_pretrained(root / "bert")
    model.save_pretrained(root / "near")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "far")
    (root / "one.txt").write_text("\n".join(SENTENCES[:12]) + "\n")
    (root / "two.txt").write_text("\n".join(SENTENCES[12:]) + "\n")
    return {name: root / name for name in ("bert", "near", "far", "one.txt", "two.txt")}


def _argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "quantize", "--model", str(data["bert"]), "--method", "gptq", "--bits", "3",
        "--group-size", "-1", "--dtype", "float32", "--format", "dequantized", "--out", str(out),
        "--calib", f"one={data['one.txt']}", "--calib", f"two={data['two.txt']}",
        "--calib-size", "8", "--max-length", "16", "--no-progress", *extra,
    ]  # fmt: skip


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["epmq", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def test_auto_weights_favour_the_far_expert_and_reach_the_solve(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "q"
    experts = ["--expert", f"one={data['near']}", "--expert", f"two={data['far']}"]
    assert _run(_argv(data, out, "--task-weights", "auto", *experts), monkeypatch) == 0
    assert "task weights (auto): one=" in capsys.readouterr().out
    weights = json.loads((out / "epmq_record.json").read_text())["record"]["settings"][
        "task_weights"
    ]
    assert sum(weights) == pytest.approx(2.0)
    assert weights[1] > 1.9  # the model is expert "one": nearly all weight goes to "two"

    loaded = BertModel.from_pretrained(out).eval().state_dict()
    weighted, uniform = _reference(data, weights), _reference(data, None)
    for name, want in weighted.items():
        assert torch.allclose(loaded[name], want, atol=1e-6), name
    moved = max(float((uniform[n] - w).abs().max()) for n, w in weighted.items())
    assert moved > 1e-3  # the weights change the rounding: the export used them


def _reference(data: dict[str, Path], weights: list[float] | None) -> dict[str, torch.Tensor]:
    """The same GPTQ run through the Python API with ``weights``."""
    model, adapter = load_model(data["bert"])
    calib, _ = load_calibration(
        load_tokenizer(data["bert"]), {"one": data["one.txt"], "two": data["two.txt"]},
        size=8, max_length=16, batch_size=8, seed=0, input_names=model_input_names(model),
    )  # fmt: skip
    quantize_model(
        model, adapter, calib, method="gptq", grid=QuantGrid(3, -1), task_weights=weights,
        engine=EngineOptions(progress=False),
    )  # fmt: skip
    return model.state_dict()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task-weights", "three=1"], "--task-weights: unknown task 'three'; the tasks are one"),
        (["--task-weights", "one=-1"], "--task-weights: the weight of task 'one' must be finite"),
        (["--task-weights", "one=0,two=0"], "--task-weights: every task weight is 0"),
        (["--task-weights", "one:2"], "--task-weights must be uniform, auto or TASK=W"),
        (["--task-weights", "auto"], "--task-weights auto needs an expert for task 'one'"),
    ],
)
def test_bad_task_weights_exit_2_with_one_line(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
    extra: list[str], message: str,
) -> None:  # fmt: skip
    out = tmp_path / "q"
    assert _run(_argv(data, out, *extra), monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("epmq: error: ")
    assert message in err
    assert not out.exists()
