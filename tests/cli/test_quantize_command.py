"""``epmq quantize``: tiny BERT / Llama folders end to end, checked against the Python API.

Tolerances (transformers 5.23 + compressed-tensors 0.20, CPU float32 compute):
- ``--dtype float32`` exports hold the solver's scales exactly, so the loaded model's outputs
  equal the in-memory quantized model's up to float rounding: 1e-5 x max |output|.
- ``--dtype float16`` (the default) rounds scales and every other tensor to float16:
  2e-3 x max |output|.
Each test also checks that quantization moved the outputs by far more than the tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.text_data import load_calibration, load_tokenizer, model_input_names
from epmq.cli import main
from epmq.cli.quantize_run import resume_dir
from epmq.models.registry import load_model
from epmq.quant import QuantGrid

pytest.importorskip("compressed_tensors")
hf_logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    *("the", "a", "cat", "dog", "owl", "fox", "bread", "apple", "soup", "rice", "good", "bad"),
    *("sad", "happy", "big", "small", "red", "blue", "is", "was", "very", "my", "your", "and"),
    *("with", "on", "near", "today", "again", "old", "new"),
]
BERT_VOCAB = len(SPECIAL) + len(WORDS)
SENTENCES = [
    " ".join(WORDS[(7 * i + 3 * k) % len(WORDS)] for k in range(3 + i % 6)) for i in range(40)
]


def _bert_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


def _llama_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(folder)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize_cli")
    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    BertModel(bert).eval().save_pretrained(root / "bert")
    _bert_tokenizer(root / "bert")
    for i in range(2):
        _perturbed(BertModel.from_pretrained(root / "bert"), i + 1).save_pretrained(root / f"e{i}")
    llama = LlamaConfig(
        vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(llama).eval().save_pretrained(root / "llama")
    _llama_tokenizer(root / "llama")
    (root / "topic.txt").write_text("\n".join(SENTENCES[:20]) + "\n\n")
    (root / "mood.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in SENTENCES[20:]))
    return {
        "root": root, "bert": root / "bert", "llama": root / "llama", "e0": root / "e0",
        "e1": root / "e1", "topic": root / "topic.txt", "mood": root / "mood.jsonl",
    }  # fmt: skip


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["epmq", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def _calib_args(data: dict[str, Path]) -> list[str]:
    return ["--calib", f"topic={data['topic']}", "--calib", f"mood={data['mood']}"]


def _reference(
    folder: Path, data: dict[str, Path], method: str, grid: QuantGrid, **kwargs
) -> torch.nn.Module:
    """The same run through the Python API (calib size 8, max length 16, batch size 8)."""
    model, adapter = load_model(folder)
    files = {"topic": data["topic"], "mood": data["mood"]}
    calib, _ = load_calibration(
        load_tokenizer(folder), files, size=8, max_length=16, batch_size=8, seed=0,
        input_names=model_input_names(model),
    )  # fmt: skip
    quantize_model(
        model,
        adapter,
        calib,
        method=method,
        grid=grid,
        **kwargs,
        engine=EngineOptions(progress=False),
    )
    return model


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(5, vocab, (3, 12), generator=torch.Generator().manual_seed(4))


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def _assert_close_and_moved(got, want, before, rel: float) -> None:
    tol = rel * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    assert float((before - want).abs().max()) > 5 * tol


SMALL = ["--calib-size", "8", "--max-length", "16", "--no-progress"]


def test_gptq_bert_compressed_tensors_float32(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from transformers import CompressedTensorsConfig

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data["bert"]), "--method", "gptq", "--bits", "3",
            "--group-size", "16", "--dtype", "float32", "--out", str(out), *_calib_args(data),
            *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "format compressed-tensors, 12 linear layers at 3 bits" in printed
    loaded = BertModel.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    reference = _reference(data["bert"], data, "gptq", QuantGrid(3, 16))
    ids = _ids(BERT_VOCAB)
    before = _hidden(BertModel.from_pretrained(data["bert"]).eval(), ids)
    _assert_close_and_moved(_hidden(loaded, ids), _hidden(reference, ids), before, 1e-5)
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["method"] == "gptq" and len(record["layers"]) == 12
    assert record["calibration"]["tasks"]["topic"] == {
        "file": str(data["topic"]), "examples": 20, "used": 8,
    }  # fmt: skip
    assert (out / "vocab.txt").is_file()


def test_epmq_bert_two_experts_symmetric(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data["bert"]), "--method", "epmq", "--bits", "3",
            "--group-size", "32", "--symmetric", "--alpha", "0.05", "--dtype", "float32",
            "--out", str(out),
            "--expert", f"topic={data['e0']}", "--expert", f"mood={data['e1']}",
            *_calib_args(data), *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    loaded = BertModel.from_pretrained(out).eval()  # symmetric: plain from_pretrained
    experts = {"topic": data["e0"], "mood": data["e1"]}
    reference = _reference(
        data["bert"], data, "epmq", QuantGrid(3, 32, True), experts=experts, alpha=0.05
    )
    ids = _ids(BERT_VOCAB)
    before = _hidden(BertModel.from_pretrained(data["bert"]).eval(), ids)
    _assert_close_and_moved(_hidden(loaded, ids), _hidden(reference, ids), before, 1e-5)
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["settings"]["experts"] == ["topic", "mood"]
    assert record["settings"]["alpha"] == 0.05


def test_gptq_llama_compressed_tensors(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import CompressedTensorsConfig

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data["llama"]), "--method", "gptq", "--bits", "4",
            "--group-size", "32", "--out", str(out), *_calib_args(data), *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    loaded = LlamaForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    reference = _reference(data["llama"], data, "gptq", QuantGrid(4, 32))
    ids = _ids(len(WORDS) + 3)
    before = _hidden(LlamaForCausalLM.from_pretrained(data["llama"]).eval(), ids)
    _assert_close_and_moved(_hidden(loaded, ids), _hidden(reference, ids), before, 2e-3)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_awq_end_to_end(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    """AWQ folds its input scales into norms / V / up rows; the export still reloads as the
    in-memory model (float32: 1e-5 x max |output|)."""
    from transformers import CompressedTensorsConfig

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data[arch]), "--method", "awq", "--bits", "4",
            "--group-size", "16", "--param", "clip=true", "--dtype", "float32",
            "--out", str(out), *_calib_args(data), *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    auto, vocab = (BertModel, BERT_VOCAB) if arch == "bert" else (LlamaForCausalLM, len(WORDS) + 3)
    loaded = auto.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    reference = _reference(data[arch], data, "awq", QuantGrid(4, 16), clip=True)
    ids = _ids(vocab)
    original = auto.from_pretrained(data[arch]).eval()
    _assert_close_and_moved(
        _hidden(loaded, ids), _hidden(reference, ids), _hidden(original, ids), 1e-5
    )
    folded = [n for n, p in reference.named_parameters() if "norm" in n.lower() or "value" in n]
    moved = [
        n for n in folded if not torch.equal(original.get_parameter(n), reference.get_parameter(n))
    ]
    assert moved  # a producer absorbed 1/s
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["method"] == "awq" and all(r["proxy_loss"] >= 0 for r in record["layers"])


def test_bias_correction_end_to_end(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--param bias_correction=true``: the refit biases reach the compressed-tensors export,
    which reloads as the in-memory model (float32: 1e-5 x max |output|)."""
    from transformers import CompressedTensorsConfig

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data["bert"]), "--method", "gptq", "--bits", "3",
            "--group-size", "16", "--param", "bias_correction=true", "--dtype", "float32",
            "--out", str(out), *_calib_args(data), *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    loaded = BertModel.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    reference = _reference(data["bert"], data, "gptq", QuantGrid(3, 16), bias_correction=True)
    original = BertModel.from_pretrained(data["bert"]).eval()
    biases = [n for n, _ in reference.named_parameters() if n.startswith("encoder.")
              and n.endswith(".bias") and "LayerNorm" not in n]  # fmt: skip
    assert len(biases) == 12
    for name in biases:
        assert torch.equal(loaded.get_parameter(name), reference.get_parameter(name)), name
        assert not torch.equal(original.get_parameter(name), reference.get_parameter(name)), name
    ids = _ids(BERT_VOCAB)
    _assert_close_and_moved(
        _hidden(loaded, ids), _hidden(reference, ids), _hidden(original, ids), 1e-5
    )
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["settings"]["bias_correction"] is True


def test_gptq_fp_end_to_end(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--method gptq-fp`` needs no experts; the export reloads as the Python API's model."""
    from transformers import CompressedTensorsConfig

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data["llama"]), "--method", "gptq-fp", "--bits", "3",
            "--group-size", "32", "--dtype", "float32", "--out", str(out), *_calib_args(data),
            *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    loaded = LlamaForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    reference = _reference(data["llama"], data, "gptq-fp", QuantGrid(3, 32))
    gptq = _reference(data["llama"], data, "gptq", QuantGrid(3, 32))
    ids = _ids(len(WORDS) + 3)
    _assert_close_and_moved(_hidden(loaded, ids), _hidden(reference, ids), _hidden(gptq, ids), 1e-5)
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["method"] == "gptq-fp"


def test_list_methods_shows_awq(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert _run(["quantize", "--list-methods"], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "awq" in printed and "n_grid" in printed and "regmean" not in printed


def test_resume_continues_an_interrupted_run(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import epmq.export

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(data["bert"]), "--method", "rtn", "--bits", "4",
            "--group-size", "-1", "--format", "dequantized", "--out", str(out), "--resume",
            *_calib_args(data), *SMALL]  # fmt: skip

    def interrupted(*args, **kwargs):
        raise RuntimeError("killed before the export")

    with monkeypatch.context() as patch:
        patch.setattr(epmq.export, "export_checkpoint", interrupted)
        with pytest.raises(RuntimeError, match="killed"):
            _run(argv, monkeypatch)
    assert not out.exists()
    assert len(list(resume_dir(out).glob("*-block-*.safetensors"))) == 2
    assert _run(argv, monkeypatch) == 0
    record = json.loads((out / "epmq_record.json").read_text())["record"]
    assert record["resumed_blocks"] == 2 and len(record["layers"]) == 12
    assert not resume_dir(out).exists()


ERRORS = [
    (["--model", "{root}/missing"], "--model folder {root}/missing does not exist"),
    (["--calib", "topic"], "--calib 'topic': expected TASK=PATH"),
    (["--calib", "news={root}/none.txt"], "--calib news: file {root}/none.txt does not exist"),
    (["--method", "bogus"], "unknown method 'bogus'; valid methods:"),
    (["--method", "regmean"], "--method 'regmean' does not round"),
    (["--alpha", "0.1"], "method 'gptq' has no parameter 'alpha'"),
    (["--param", "percdamp=-1"], "parameter 'percdamp' must be in"),
    (["--bits", "9"], "--bits must be in 2..8, got 9"),
    (["--group-size", "24"], "--group-size 24 does not divide the input width 32"),
    (["--format", "gguf"], "unknown export format 'gguf'"),
    (["--x-source", "teacher"], "--x-source must be one of"),
    (["--method", "epmq", "--expert", "topic={e0}"], "needs an expert for task 'mood'"),
    (["--expert", "news={e0}"], "--expert news: no calibration data for task 'news'"),
    (["--act-order"], "--act-order with groups cannot be stored as compressed-tensors"),
]


@pytest.mark.parametrize(("extra", "message"), ERRORS)
def test_user_mistakes_exit_2_with_one_line(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
    extra: list[str], message: str,
) -> None:  # fmt: skip
    fill = {"root": str(data["root"]), "e0": str(data["e0"])}
    extra = [e.format(**fill) for e in extra]
    argv = ["quantize", "--model", str(data["bert"]), "--method", "gptq", "--bits", "4",
            "--group-size", "16", "--out", str(tmp_path / "q"), *_calib_args(data), *SMALL,
            *extra]  # fmt: skip
    assert _run(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("epmq: error: ")
    assert message.format(**fill) in err
    assert not (tmp_path / "q").exists()


def test_missing_flags_and_existing_output(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert _run(["quantize", "--method", "gptq"], monkeypatch) == 2
    assert "--model is required" in capsys.readouterr().err
    out = tmp_path / "q"
    out.mkdir()
    argv = ["quantize", "--model", str(data["bert"]), "--method", "rtn", "--bits", "4",
            "--group-size", "-1", "--out", str(out), *_calib_args(data), *SMALL]  # fmt: skip
    assert _run(argv, monkeypatch) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert _run([*argv, "--force"], monkeypatch) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_torchrun_two_ranks_equal_one_process(
    data: dict[str, Path], tmp_path: Path, method: str
) -> None:
    """``torchrun --nproc-per-node 2 -m epmq quantize`` (gloo, each rank a shard of every
    task's batches, the solves shared out): the same checkpoint as one process, up to float
    summation order (integer codes equal, scales within float32 rounding). AWQ's input scales
    are searched on every rank and folded there (norms, V and up rows)."""
    import os
    import subprocess

    from safetensors.torch import load_file

    args = ["quantize", "--model", str(data["llama"]), "--method", method, "--bits", "4",
            "--group-size", "32", "--dtype", "float32", "--device", "cpu", "--batch-size", "2",
            *_calib_args(data), *SMALL]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "epmq", *args, "--out", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += ["--nproc-per-node", "2"]
    two = subprocess.run(
        [*launch, "-m", "epmq", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "on 2 ranks" in two.stdout
    want = load_file(str(tmp_path / "one" / "model.safetensors"))
    got = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    packed = [k for k in want if not want[k].is_floating_point()]
    assert any(k.endswith("weight_packed") for k in packed)
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(got[key], value), key


def test_merge_regmean_from_calibration_text(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``epmq merge --method regmean --calib ...``: the non-linear tensors averaged, every
    linear solved by the layer-wise RegMean solver on the experts' own inputs; the same as the
    averaged folder through ``quantize_model(method="regmean")``."""
    from epmq.merging import merge_checkpoints

    out = tmp_path / "regmean"
    argv = ["merge", "--base", str(data["bert"]), "--expert", str(data["e0"]), "--expert",
            str(data["e1"]), "--method", "regmean", "--param", "reduce_ratio=0.9",
            *_calib_args(data), "--calib-size", "8", "--max-length", "16",
            "--out", str(out)]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    averaged = merge_checkpoints(
        data["bert"], [data["e0"], data["e1"]], tmp_path / "avg", "average"
    )
    model, adapter = load_model(averaged)
    files = {"topic": data["topic"], "mood": data["mood"]}
    calib, _ = load_calibration(
        load_tokenizer(data["bert"]), files, size=8, max_length=16, batch_size=8
    )
    quantize_model(
        model,
        adapter,
        calib,
        method="regmean",
        reduce_ratio=0.9,
        experts={"topic": data["e0"], "mood": data["e1"]},
        engine=EngineOptions(progress=False),
    )
    merged, _ = load_model(out)
    reference, average = model.state_dict(), load_model(averaged)[0].state_dict()
    moved = 0
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)
        moved += not torch.equal(value, average[name])
    assert moved >= 12  # every linear weight left the average
    assert (out / "vocab.txt").is_file()


def test_offload_dir_exports_the_same_checkpoint(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    argv = ["quantize", "--model", str(data["llama"]), "--method", "gptq", "--bits", "4",
            "--group-size", "32", *_calib_args(data), *SMALL]  # fmt: skip
    offload = tmp_path / "scratch"
    assert (
        _run([*argv, "--out", str(tmp_path / "a"), "--offload-dir", str(offload)], monkeypatch) == 0
    )
    assert _run([*argv, "--out", str(tmp_path / "b")], monkeypatch) == 0
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(offload.iterdir()) == []  # the activations' files are gone
