"""The whole pipeline on the tiny stand-in suite: experts → merges → quantizers → report."""

import json
from pathlib import Path

import pytest

from epmq.errors import EpmqError
from epmq.eval.results import average, load_results
from epmq.experiment.config import parse_config
from epmq.experiment.session import run_session


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("suite-cache")


def _config(out: Path) -> object:
    return parse_config(
        {
            "name": "tiny-pipeline",
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
            "quantization": {
                "methods": ["rtn", "gptq", "epmq"],
                "bits": [8, 3],
                "alpha": 0.1,
                "alpha_sweep": [0.1, 10.0],
            },
            "output": {"dir": str(out)},
        }
    )


def test_pipeline_writes_a_report_with_every_variant(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    lines: list[str] = []
    results, folder = run_session(
        _config(out), quick=True, cache_dir=cache_dir, progress=False, announce=lines.append
    )
    assert folder == out
    assert {p.name for p in out.iterdir()} >= {"report.md", "results.json", "config.yaml"}
    saved = load_results(out / "results.json")
    assert [r.name for r in saved.rows] == [r.name for r in results.rows]

    kinds = [r.kind for r in results.rows]
    assert kinds[:3] == ["pretrained", "expert", "merged"]
    assert kinds.count("target") == 1
    quantized = results.find(kind="quantized")
    assert {(r.quantizer, r.bits) for r in quantized} == {
        (q, b) for q in ("rtn", "gptq", "epmq") for b in (8, 3)
    }
    merged = results.find(kind="merged")[0]
    target = results.find(kind="target")[0]
    for row in results.find(kind="quantized", bits=8):
        # 8-bit rounding barely moves a model: every task within a few examples of what was
        # rounded (the merge for RTN/GPTQ, the continuous target W* for E-PMQ).
        reference = target if row.quantizer == "epmq" else merged
        for task, acc in row.accuracy.items():
            assert abs(acc - reference.accuracy[task]) <= 0.05, (row.name, task)
    sweep = results.sweeps["alpha"]
    assert {(p.params["alpha"], p.params["target"]) for p in sweep} == {
        (0.1, "expert"),
        (0.1, "merged"),
        (10.0, "expert"),
        (10.0, "merged"),
    }
    table = (out / "report.md").read_text()
    assert f"{100 * average(merged):.1f}" in table
    assert json.loads((out / "results.json").read_text())["suite"] == "tiny"
    assert any("report written" in line for line in lines)


def test_pipeline_refuses_to_overwrite_before_any_work(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    with pytest.raises(EpmqError, match="--force"):
        run_session(_config(out), quick=True, cache_dir=cache_dir, progress=False)


def test_bfloat16_evaluation_runs_and_is_recorded(cache_dir: Path, tmp_path: Path) -> None:
    config = parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
            "quantization": {"methods": ["gptq"], "bits": [8], "alpha_sweep": []},
            "evaluation": {"dtype": "bfloat16"},
            "output": {"dir": str(tmp_path / "bf16")},
        }
    )
    reference = parse_config(
        {
            **config.model_dump(mode="json"),
            "evaluation": {},
            "output": {"dir": str(tmp_path / "f32")},
        }
    )
    bf16, _ = run_session(config, quick=True, cache_dir=cache_dir, progress=False, announce=print)
    f32, _ = run_session(reference, quick=True, cache_dir=cache_dir, progress=False, announce=print)
    assert bf16.settings["config"]["evaluation"]["dtype"] == "bfloat16"
    assert "Evaluated with bfloat16" in (tmp_path / "bf16" / "report.md").read_text()
    assert "Evaluated with" not in (tmp_path / "f32" / "report.md").read_text()
    assert [r.name for r in bf16.rows] == [r.name for r in f32.rows]
    for a, b in zip(bf16.rows, f32.rows, strict=True):  # a few flipped predictions at most
        for task in a.accuracy:
            assert abs(a.accuracy[task] - b.accuracy[task]) <= 0.1, (a.name, task)


@pytest.mark.parametrize("model_dtype", ["bfloat16", "float16"])
def test_half_precision_models_give_the_float32_accuracy(
    cache_dir: Path, tmp_path: Path, model_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base, experts and merges held in half precision (statistics and solves in float32):
    every row within a few test examples of the float32 run, and the models really held in
    that dtype when they are evaluated."""
    import torch

    from epmq.experiment import runner

    seen: list[torch.dtype] = []
    real = runner._evaluate

    def spy(config, workload, model, heads, tasks):  # type: ignore[no-untyped-def]
        seen.append(next(model.parameters()).dtype)
        return real(config, workload, model, heads, tasks)

    monkeypatch.setattr(runner, "_evaluate", spy)
    plain = {
        "suite": "tiny",
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["gptq", "epmq"], "bits": [8], "alpha_sweep": []},
        "output": {"dir": str(tmp_path / "f32")},
    }
    half = {**plain, "model_dtype": model_dtype, "output": {"dir": str(tmp_path / "half")}}
    f32, _ = run_session(parse_config(plain), quick=True, cache_dir=cache_dir, progress=False)
    seen.clear()
    low, _ = run_session(parse_config(half), quick=True, cache_dir=cache_dir, progress=False)
    assert set(seen) == {getattr(torch, model_dtype)}
    assert [r.name for r in low.rows] == [r.name for r in f32.rows]
    for a, b in zip(low.rows, f32.rows, strict=True):
        for task in a.accuracy:
            assert abs(a.accuracy[task] - b.accuracy[task]) <= 0.1, (a.name, task)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_regmean_reduce_ratio_reaches_the_engine(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ratio: float
) -> None:
    import epmq.calib

    real = epmq.calib.quantize_model
    seen: list[float] = []

    def spy(*args: object, **kwargs: object) -> object:
        if kwargs.get("method") == "regmean":
            seen.append(float(kwargs["reduce_ratio"]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(epmq.calib, "quantize_model", spy)
    config = parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "regmean", "params": {"reduce_ratio": ratio}}],
            "quantization": {"methods": ["rtn"], "bits": [8]},
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    run_session(config, quick=True, cache_dir=cache_dir, progress=False, announce=lambda _: None)
    assert seen == [ratio]


def test_fp_target_gptq_rows_sit_beside_gptq_and_epmq(cache_dir: Path, tmp_path: Path) -> None:
    """Listing ``gptq-fp`` in ``quantization.methods`` is all it takes; the α sweep and the
    X-source study stay on E-PMQ."""
    out = tmp_path / "report"
    config = parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
            "quantization": {
                "methods": ["gptq", "gptq-fp", "epmq"],
                "bits": [3],
                "alpha_sweep": [10.0],
                "x_source_study": True,
            },
            "output": {"dir": str(out)},
        }
    )
    results, _ = run_session(
        config, quick=True, cache_dir=cache_dir, progress=False, announce=lambda _: None
    )
    rows = results.find(kind="quantized", quantizer="gptq-fp")
    assert len(rows) == 1 and rows[0].x_source is None and rows[0].study is None
    assert {r.quantizer for r in results.find(kind="quantized", study=None)} >= {"gptq", "epmq"}
    assert all(p.quantizer == "epmq" for p in results.sweeps["alpha"])
    assert "GPTQ (fp targets)" in (out / "report.md").read_text()


def test_corrections_run_in_an_experiment(cache_dir: Path, tmp_path: Path) -> None:
    """GPTQ with ``norm_correction`` reads the experts (the norms' targets) although GPTQ's
    solve does not: the runner passes them whenever the solver says it needs them."""
    corrections = {"norm_correction": True, "bias_correction": True}
    config = parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
            "quantization": {
                "methods": ["gptq", "epmq"],
                "bits": [3],
                "params": {"gptq": corrections, "epmq": corrections},
                "evaluate_target": False,
            },
            "output": {"dir": str(tmp_path / "report")},
        }
    )
    results, _ = run_session(
        config, quick=True, cache_dir=cache_dir, progress=False, announce=lambda _: None
    )
    for quantizer in ("gptq", "epmq"):
        (row,) = results.find(kind="quantized", quantizer=quantizer)
        assert row.params["norm_correction"] and row.params["bias_correction"]
