"""The runner's shared work changes no figure: RTN without data, one statistics cache per merge."""

from pathlib import Path

import pytest
import torch

from epmq.calib.stats_cache import StatsCache
from epmq.experiment import runner
from epmq.experiment.config import parse_config
from epmq.experiment.workload import suite_workload


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("suite-cache")
    return suite_workload("tiny", quick=True, cache_dir=cache, progress=False)


def _config(out: Path) -> object:
    return parse_config(
        {
            "name": "tiny-shared",
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
            "quantization": {
                "methods": ["rtn", "gptq", "epmq"],
                "bits": [4, 3],
                "x_source": "merged",
                "alpha_sweep": [0.1, 1.0],
            },
            "output": {"dir": str(out)},
        }
    )


def test_shared_work_gives_the_same_results(
    workload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path / "out")
    built: list[tuple[str, dict, dict]] = []

    def on_model(variant, model, run) -> None:
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        built.append((variant.name, weights, {} if run is None else run.settings["tasks"]))

    caches: list[StatsCache] = []
    monkeypatch.setattr(runner, "StatsCache", lambda: caches.append(StatsCache()) or caches[-1])
    shared = runner.run_experiment(config, workload, announce=lambda _: None, on_model=on_model)
    assert len(caches) == 1 and caches[0].hits > 0  # later merged-stream variants read it
    names = [name for name, _, _ in built]
    assert any("rtn" in name for name in names)
    for name, _, tasks in built:
        if " rtn " in name:
            assert tasks == {}  # rounded without calibration data

    baseline: list[tuple[str, dict, dict]] = []
    monkeypatch.setattr(runner, "StatsCache", lambda: None)  # every variant computes its own

    def record(variant, model, run) -> None:
        baseline.append((variant.name, model.state_dict(), {}))

    plain = runner.run_experiment(config, workload, announce=lambda _: None, on_model=record)
    assert [name for name, _, _ in baseline] == names
    for (name, weights, _), (_, expected, _) in zip(built, baseline, strict=True):
        for key, value in expected.items():
            assert torch.equal(weights[key], value), (name, key)
    assert [r.accuracy for r in shared.rows] == [r.accuracy for r in plain.rows]
    assert shared.sweeps == plain.sweeps
