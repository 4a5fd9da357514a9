"""``quantization.task_weights`` in an experiment on the tiny suite: ``auto`` weights reach every
layer's solve, the rows record them, the study sets uniform beside auto, and the report
compares the worst task; bad settings stop with one line naming the field."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from epmq.calib import block, task_weights
from epmq.cli import main
from epmq.errors import EpmqError
from epmq.eval.report import render_markdown
from epmq.experiment import runner
from epmq.experiment.config import load_config, parse_config
from epmq.experiment.workload import suite_workload


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("suite-cache")
    return suite_workload("tiny", quick=True, cache_dir=cache, progress=False)


def _config(**quant: Any) -> Any:
    quantization = {"methods": ["rtn", "gptq", "epmq"], "bits": [3], "evaluate_target": False}
    return parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
            "quantization": {**quantization, **quant},
        }
    )


def _run(config: Any, workload: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict]:
    """Run ``config``; per variant, the task weights every layer's solve received."""
    solved: list[Any] = []
    real = block.solve_layer

    def spy(problem: Any, options: Any) -> Any:
        solved.append(None if options.task_weights is None else list(options.task_weights))
        return real(problem, options)

    monkeypatch.setattr(block, "solve_layer", spy)
    seen: dict[str, tuple[list[Any], Any]] = {}

    def on_model(variant: Any, model: Any, run: Any) -> None:
        settings = None if run is None else run.settings["task_weights"]
        seen[variant.name] = (list(solved), settings)
        solved.clear()

    results = runner.run_experiment(config, workload, announce=lambda _: None, on_model=on_model)
    return results, seen


def test_auto_weights_reach_every_solve_and_the_report(
    workload: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[int] = []
    real = task_weights.distances
    monkeypatch.setattr(
        task_weights, "distances", lambda *a, **k: measured.append(1) or real(*a, **k)
    )
    config = _config(task_weights="auto", task_weights_study=True, task_weight_rounds=0)
    results, seen = _run(config, workload, monkeypatch)
    tasks = results.tasks
    epmq = results.quantized("task_arithmetic", "epmq", 3, None)
    assert epmq is not None and epmq.task_weights is not None
    chosen = epmq.task_weights
    assert chosen.setting == "auto" and list(chosen.weights) == tasks
    assert sum(chosen.weights.values()) == pytest.approx(len(tasks))
    assert len(chosen.rounds) == 1  # round 0 only
    values = [chosen.weights[t] for t in tasks]
    assert values != [1.0] * len(tasks)
    calls, settings = seen[epmq.name]
    assert calls and all(c == values for c in calls)  # every linear solved with them
    assert settings == values
    gptq = results.quantized("task_arithmetic", "gptq", 3, None)
    assert gptq is not None and gptq.task_weights == chosen  # one measurement per merge
    assert len(measured) == 1
    rtn = results.quantized("task_arithmetic", "rtn", 3, None)
    assert rtn is not None and rtn.task_weights is None  # rounds without data

    study = [r for r in results.rows if r.study == "task_weights"]
    assert [r.quantizer for r in study] == ["epmq"]
    assert study[0].task_weights is not None and study[0].task_weights.setting == "uniform"
    assert "weights=uniform" in study[0].name
    calls, settings = seen[study[0].name]
    assert calls and all(c is None for c in calls) and settings is None

    report = render_markdown(results)
    section = report[report.index("## Task weights") :]
    assert "| auto − uniform |" in section
    worst = min(epmq.accuracy.values())
    assert f"| auto | {100 * worst:.1f} (" in section
    assert "auto task weights" in report[: report.index("## Task weights")]  # the main table


def test_a_fixed_point_round_quantizes_with_round_0s_weights_first(
    workload: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(methods=["epmq"], task_weights="auto")  # one round by default
    results, seen = _run(config, workload, monkeypatch)
    row = results.quantized("task_arithmetic", "epmq", 3, None)
    assert row is not None and row.task_weights is not None
    assert len(row.task_weights.rounds) == 2
    start = task_weights.initial_weights(row.task_weights.rounds[0])
    final = task_weights.reweighted(start, row.task_weights.rounds[1])
    assert row.task_weights.weights == pytest.approx(final)
    calls, _ = seen[row.name]
    tasks = results.tasks
    distinct = [c for i, c in enumerate(calls) if i == 0 or c != calls[i - 1]]
    assert distinct == [
        pytest.approx([start[t] for t in tasks]),
        pytest.approx([final[t] for t in tasks]),
    ]


def test_a_suite_task_the_workload_lacks_is_refused(workload: Any) -> None:
    config = _config(task_weights={"nope": 1.0})
    with pytest.raises(EpmqError, match=r"quantization.task_weights: unknown task 'nope'"):
        runner.run_experiment(config, workload, announce=lambda _: None)


USER = """
base: {path: models/base}
experts:
  - {name: a, path: models/a, task: ta}
  - {name: b, path: models/b, task: tb}
tasks:
  - {name: ta, data: data/a.csv, format: csv}
  - {name: tb, data: data/b.csv, format: csv}
output: {dir: out}
quantization: {task_weights: WEIGHTS}
"""


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("{tc: 1}", "quantization.task_weights: unknown task 'tc'; the tasks are ta, tb"),
        ("{ta: -1}", "quantization.task_weights: the weight of task 'ta' must be finite and >= 0"),
        ("{ta: 0, tb: 0}", "quantization.task_weights: every task weight is 0"),
        ("{ta: .nan}", "the weight of task 'ta' must be finite"),
        ("{ta: x}", "the weight of task 'ta' must be a number"),
        ("automatic", "quantization.task_weights: must be uniform, auto or a mapping"),
    ],
)
def test_bad_task_weights_exit_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, weights: str, message: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(USER.replace("WEIGHTS", weights))
    with pytest.raises(EpmqError, match="task_weights"):
        load_config(path)
    monkeypatch.setattr(sys, "argv", ["epmq", "run", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"epmq: error: {path}: ")
    assert message in err
    assert not (tmp_path / "out").exists()


def test_given_weights_and_the_defaults() -> None:
    assert _config().quantization.task_weights == "uniform"
    assert _config().quantization.task_weight_rounds == 1
    assert _config(task_weights={"a": 2}).quantization.task_weights == {"a": 2.0}


def test_the_study_pairs_every_guided_row_with_the_other_weighting() -> None:
    from epmq.experiment.plan import plan_experiment

    config = parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic"}, {"method": "ties"}],
            "quantization": {"bits": [4, 3], "task_weights": "auto", "task_weights_study": True},
        }
    )
    plan = plan_experiment(config)
    study = [v for v in plan if v.study == "task_weights"]
    assert {(v.merge, v.quantizer, v.bits) for v in study} == {
        (m, "epmq", b) for m in ("task_arithmetic", "ties") for b in (4, 3)
    }
    assert all(v.weights_setting(config) == "uniform" for v in study)
    assert all(v.weights_setting(config) == "auto" for v in plan if v.study is None)
    assert len({v.name for v in plan}) == len(plan) and len({v.slug for v in plan}) == len(plan)
    assert study[0].slug.endswith("-weights-uniform")
