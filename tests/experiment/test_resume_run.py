"""A stopped experiment resumes from its journal and ends with the uninterrupted run's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epmq.atomic import partial_dir
from epmq.errors import EpmqError
from epmq.eval.results import Results
from epmq.experiment.config import parse_config
from epmq.experiment.journal import JOURNAL_FILE
from epmq.experiment.session import run_session


class Stop(Exception):
    """Stands in for Ctrl-C or a killed job."""


def _config(out: Path, alpha: float = 0.1) -> Any:
    return parse_config(
        {
            "suite": "tiny",
            "merges": [
                {"method": "task_arithmetic", "params": {"scale": 0.5}},
                {"method": "ties", "params": {"density": 0.5, "scale": 0.5}},
            ],
            "quantization": {
                "methods": ["rtn", "gptq", "epmq"],
                "bits": [4],
                "alpha": alpha,
                "alpha_sweep": [0.1, 1.0],
            },
            "output": {"dir": str(out), "export": ["dequantized"]},
        }
    )


def _stop_after(models: int, lines: list[str]) -> Any:
    """An ``announce`` that raises once ``models`` models have been reported."""

    def announce(line: str) -> None:
        lines.append(line)
        if sum(line.startswith("  ") for line in lines) >= models:
            raise Stop

    return announce


def _figures(results: Results) -> tuple[list[Any], list[Any]]:
    rows = [(r.name, r.accuracy) for r in results.rows]
    points = sorted(
        (p.merge, p.params["target"], p.params["alpha"], p.average) for p in results.sweeps["alpha"]
    )
    return rows, points


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("suite-cache")


def _run(config: Any, cache_dir: Path, **kwargs: Any) -> tuple[Results, Path]:
    kwargs.setdefault("announce", lambda line: None)
    return run_session(config, quick=True, cache_dir=cache_dir, progress=False, **kwargs)


def test_stopped_run_resumes_to_the_uninterrupted_report(cache_dir: Path, tmp_path: Path) -> None:
    reference, _ = _run(_config(tmp_path / "reference"), cache_dir)

    out = tmp_path / "stopped"
    lines: list[str] = []
    with pytest.raises(Stop):
        _run(_config(out), cache_dir, announce=_stop_after(7, lines))
    partial = partial_dir(out)
    assert not out.exists() and (partial / JOURNAL_FILE).is_file()
    assert any("--resume continues it" in line for line in lines)

    with pytest.raises(EpmqError, match="--resume"):  # nothing is thrown away by accident
        _run(_config(out), cache_dir)

    lines = []
    resumed, folder = _run(_config(out), cache_dir, resume=True, announce=lines.append)
    restored = [line for line in lines if "(from the journal)" in line]
    assert len(restored) == 7  # each model is journalled before it is announced
    assert any("7 models already finished" in line for line in lines)
    assert len(lines) - len(restored) > 7  # the rest was built
    assert _figures(resumed) == _figures(reference)
    assert folder == out and not partial.exists() and not (out / JOURNAL_FILE).exists()
    exported = {e["variant"] for e in resumed.settings["exports"]}
    wanted = {r.name for r in reference.rows if r.kind == "quantized"}
    assert exported == wanted
    assert all((out / e["folder"] / "config.json").is_file() for e in resumed.settings["exports"])


def test_resume_refuses_other_settings_and_force_starts_over(
    cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(Stop):
        _run(_config(out), cache_dir, announce=_stop_after(3, []))
    with pytest.raises(EpmqError, match="other settings"):
        _run(_config(out, alpha=0.5), cache_dir, resume=True)
    lines: list[str] = []
    results, _ = _run(_config(out, alpha=0.5), cache_dir, force=True, announce=lines.append)
    assert not any("from the journal" in line for line in lines)
    assert not partial_dir(out).exists() and out.is_dir()
    assert results.row("task_arithmetic + epmq w4").params["alpha"] == 0.5


def test_resume_without_a_stopped_run_is_a_plain_run(cache_dir: Path, tmp_path: Path) -> None:
    results, out = _run(_config(tmp_path / "fresh"), cache_dir, resume=True)
    assert out.is_dir() and results.rows


def test_resume_reuses_a_partial_folder_stopped_before_any_model(
    cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "early"
    partial_dir(out).mkdir(parents=True)  # stopped before its journal was written
    with pytest.raises(EpmqError, match="--resume"):
        _run(_config(out), cache_dir)
    results, folder = _run(_config(out), cache_dir, resume=True)
    assert folder.is_dir() and not partial_dir(out).exists() and results.rows


def test_export_redone_after_a_stop_is_listed_once(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after a variant's export and before its row: the resumed run redoes it, and
    report.md / results.json list it once, as the uninterrupted run does."""
    from epmq.experiment.exports import VariantExporter

    reference, _ = _run(_config(tmp_path / "reference"), cache_dir)
    export = VariantExporter.__call__
    calls: list[int] = []

    def stop_after_second_export(self: VariantExporter, variant: Any, model: Any, run: Any) -> None:
        before = len(self.written)
        export(self, variant, model, run)
        if len(self.written) > before:
            calls.append(1)
            if len(calls) == 2:
                raise Stop

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(VariantExporter, "__call__", stop_after_second_export)
        with pytest.raises(Stop):
            _run(_config(out), cache_dir)
    resumed, _ = _run(_config(out), cache_dir, resume=True)
    folders = [e["folder"] for e in resumed.settings["exports"]]
    assert folders == [e["folder"] for e in reference.settings["exports"]]
    assert len(set(folders)) == len(folders)
    saved = json.loads((out / "results.json").read_text())["settings"]["exports"]
    assert [e["folder"] for e in saved] == folders
    report = (out / "report.md").read_text()
    assert all(report.count(f"`{folder}`") == 1 for folder in folders)
