"""``epmq quantize --param norm_correction=true`` end to end on tiny BERT and Llama folders.

The export (float32) reloads as the same run through the Python API (1e-5 x max |output|, as
``test_quantize_command.py``), and the norms it holds are the refitted ones, not the merge's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_quantize_command import (  # noqa: F401  (data: the folders fixture)
    BERT_VOCAB,
    SMALL,
    WORDS,
    _assert_close_and_moved,
    _calib_args,
    _hidden,
    _ids,
    _reference,
    _run,
    data,
)
from transformers import BertModel, LlamaForCausalLM

from epmq.quant import QuantGrid

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


def _llama_experts(folders: dict[str, Path]) -> dict[str, Path]:
    """Two Llama experts: the base with every tensor of its layers perturbed (norms too)."""
    gen = torch.Generator().manual_seed(3)
    made = {}
    for task in ("topic", "mood"):
        model = LlamaForCausalLM.from_pretrained(folders["llama"]).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".layers." in name:
                    spread = 0.1 if "norm" in name else 0.1 * float(p.std())
                    p.add_(spread * torch.randn(p.shape, generator=gen))
        made[task] = folders["root"] / f"llama-{task}"
        if not made[task].exists():
            model.save_pretrained(made[task])
    return made


@pytest.mark.parametrize(
    ("arch", "method", "x_source"), [("bert", "epmq", "expert"), ("llama", "gptq", "quantized")]
)
def test_norm_correction_end_to_end(
    data: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
    method: str,
    x_source: str,
) -> None:
    from transformers import CompressedTensorsConfig

    experts = {"topic": data["e0"], "mood": data["e1"]} if arch == "bert" else _llama_experts(data)
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data[arch]), "--method", method, "--bits", "4",
            "--group-size", "16", "--param", "norm_correction=true", "--x-source", x_source,
            "--dtype", "float32", "--out", str(out), *_calib_args(data), *SMALL]  # fmt: skip
    for task, folder in experts.items():
        argv += ["--expert", f"{task}={folder}"]
    assert _run(argv, monkeypatch) == 0
    auto, vocab = (BertModel, BERT_VOCAB) if arch == "bert" else (LlamaForCausalLM, len(WORDS) + 3)
    loaded = auto.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    reference = _reference(
        data[arch], data, method, QuantGrid(4, 16), experts=experts, x_source=x_source,
        norm_correction=True,
    )  # fmt: skip
    ids = _ids(vocab)
    original = auto.from_pretrained(data[arch]).eval()
    _assert_close_and_moved(
        _hidden(loaded, ids), _hidden(reference, ids), _hidden(original, ids), 1e-5
    )
    norms = [n for n, _ in reference.named_parameters() if "norm" in n.lower() and "layer" in n]
    assert norms
    for name in norms:  # exported as fitted, and the fit moved every one
        assert torch.equal(loaded.get_parameter(name), reference.get_parameter(name)), name
        assert not torch.equal(original.get_parameter(name), reference.get_parameter(name)), name
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["settings"]["norm_correction"] is True


def test_norm_correction_without_experts_is_one_line(
    data: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data["bert"]), "--method", "gptq", "--bits", "4",
            "--param", "norm_correction=true", "--out", str(out), *_calib_args(data),
            *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--param norm_correction=true needs an expert" in err[0]
    assert not out.exists()
