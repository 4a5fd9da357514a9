"""``epmq eval`` on the tiny suite: printed and JSON accuracies equal ``evaluate_accuracy``.

Quantized folders come from ``epmq quantize`` with ``--dtype float32``: a compressed-tensors
export dequantizes on load to exactly the weights of the ``dequantized`` export of the same
(deterministic) run, so both must give the same predictions and accuracies.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from epmq.cli import main
from epmq.eval.accuracy import evaluate_accuracy
from epmq.suites import Suite, get_suite

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("eval_cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster without thread sync
    suite = get_suite("tiny", cache_dir=root / "cache", quick=True)
    models = suite.prepare(progress=False)
    encoders = [suite.load_encoder(models.expert_dirs[t]) for t in suite.task_names]
    merged = encoders[0]
    with torch.no_grad():
        for name, param in merged.named_parameters():
            param.copy_(sum(e.get_parameter(name) for e in encoders) / len(encoders))
    merged.save_pretrained(root / "merged")
    suite.tokenizer.save_pretrained(root / "merged")
    calib = []
    for task in suite.tasks:
        (root / f"{task.name}.txt").write_text("\n".join(task.calib.texts))
        calib += ["--calib", f"{task.name}={root / f'{task.name}.txt'}"]
    heads = {t: suite.load_head(models.expert_dirs[t]) for t in suite.task_names}
    yield {"root": root, "suite": suite, "heads": heads, "calib": calib}
    torch.set_num_threads(threads)


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["epmq", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def _quantize(env: dict, out: Path, fmt: str, monkeypatch, *extra: str) -> Path:
    argv = ["quantize", "--model", str(env["root"] / "merged"), "--method", "gptq", "--bits",
            "2", "--group-size", "16", "--dtype", "float32", "--format", fmt, "--out", str(out),
            "--calib-size", "16", "--max-length", "16", "--no-progress", *env["calib"],
            *extra]  # fmt: skip
    assert _run(argv, monkeypatch) == 0
    return out


def _eval(env: dict, model: Path, monkeypatch, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    argv = ["eval", "--suite", "tiny", "--quick", "--cache-dir", str(env["root"] / "cache"),
            "--model", str(model), "--no-progress", *extra]  # fmt: skip
    code = _run(argv, monkeypatch)
    return code, capsys.readouterr().out


def _table(out: str) -> dict[str, str]:
    rows = [line.split() for line in out.splitlines()]
    return {r[0]: r[1] for r in rows if len(r) == 2 and r[1].endswith("%")}


def _expected_table(accuracy: dict[str, float]) -> dict[str, str]:
    table = {t: f"{100 * a:.2f}%" for t, a in accuracy.items()}
    table["average"] = f"{100 * sum(accuracy.values()) / len(accuracy):.2f}%"
    return table


def test_merged_folder_table_and_json(
    env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    suite: Suite = env["suite"]
    merged = env["root"] / "merged"
    expected = evaluate_accuracy(
        suite.load_encoder(merged), env["heads"], suite.tasks, tokenizer=suite.tokenizer,
        max_examples=40,
    )  # fmt: skip
    code, out = _eval(env, merged, monkeypatch, capsys, "--max-test", "40", "--json",
                      str(tmp_path / "acc.json"))  # fmt: skip
    assert code == 0
    assert _table(out) == _expected_table(expected)
    data = json.loads((tmp_path / "acc.json").read_text())
    assert data["accuracy"] == expected and data["max_test"] == 40
    assert data["suite"] == "tiny" and data["suite_key"] == suite.key
    # an existing --json is kept unless --force
    code, _ = _eval(env, merged, monkeypatch, capsys, "--json", str(tmp_path / "acc.json"))
    assert code == 2
    assert json.loads((tmp_path / "acc.json").read_text())["max_test"] == 40


@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_equals_dequantized_export(
    env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, symmetric: bool
) -> None:
    suite: Suite = env["suite"]
    extra = ("--symmetric",) if symmetric else ()
    ct = _quantize(env, tmp_path / "ct", "compressed-tensors", monkeypatch, *extra)
    plain = _quantize(env, tmp_path / "dq", "dequantized", monkeypatch, *extra)
    expected = evaluate_accuracy(
        suite.load_encoder(plain), env["heads"], suite.tasks, tokenizer=suite.tokenizer
    )
    # the compressed-tensors folder loads to the dequantized export's weights, which differ
    # from the float merge's (so a loader that ignored the quantization would fail here)
    name = "encoder.layer.1.output.dense.weight"
    weights = [
        suite.load_encoder(folder).get_parameter(name).detach()
        for folder in (ct, plain, env["root"] / "merged")
    ]
    assert torch.equal(weights[0], weights[1])
    assert float((weights[1] - weights[2]).abs().max()) > 1e-3
    for folder in (ct, plain):
        code, out = _eval(env, folder, monkeypatch, capsys, "--json", str(tmp_path / "a.json"),
                          "--force")  # fmt: skip
        assert code == 0
        assert _table(out) == _expected_table(expected)
        assert json.loads((tmp_path / "a.json").read_text())["accuracy"] == expected


def test_errors_exit_2_with_one_line(
    env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    gptq = _quantize(env, tmp_path / "gptq", "gptq", monkeypatch, "--symmetric")
    cases = [
        (["--suite", "nope", "--model", str(env["root"] / "merged")], "unknown suite 'nope'"),
        (["--suite", "tiny", "--model", str(tmp_path / "none")], "does not exist"),
        (["--suite", "tiny", "--model", str(tmp_path)], "no config.json"),
        (["--suite", "tiny", "--model", str(gptq)], "a 'gptq' checkpoint loads only in a GPTQ"),
        (["--model", str(gptq)], "--suite is required"),
        (["--suite", "tiny", "--model", str(gptq), "--max-test", "0"], "--max-test must be >= 1"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        argv = ["eval", "--cache-dir", str(env["root"] / "cache"), "--quick", *argv]
        assert _run(argv, monkeypatch) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("epmq: error: ") and message in err, err
