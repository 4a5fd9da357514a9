"""The Markdown report, the PNG plots and ``epmq report`` on a synthetic experiment."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from epmq.cli import main
from epmq.errors import EpmqError
from epmq.eval.gains import attribute
from epmq.eval.plots import accuracy_by_bits, alpha_sweep, build_plots, per_task_bars
from epmq.eval.report import render_markdown, write_report
from epmq.eval.results import Machine, Results, Row, SweepPoint, Versions

TASKS = ["sst", "news", "digits"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
A = {"alpha": 0.1}  # E-PMQ's parameters in the rows below


def row(name: str, kind: str, accs: tuple[float, ...], **fields: Any) -> Row:
    return Row(name=name, kind=kind, accuracy=dict(zip(TASKS, accs, strict=True)), **fields)


def q(name: str, merge: str, quantizer: str, bits: int, accs: tuple[float, ...], **kw: Any) -> Row:
    return row(name, "quantized", accs, merge=merge, quantizer=quantizer, bits=bits, **kw)


def make_results(*, sweep: bool = True) -> Results:
    """Two merges, RTN/GPTQ/E-PMQ at 4 and 3 bits, targets, X-source variants, an α sweep."""
    rows = [
        row("pretrained", "pretrained", (0.50, 0.40, 0.30)),
        row("experts", "expert", (0.90, 0.80, 0.70)),
        row("ta", "merged", (0.80, 0.70, 0.60), merge="ta"),
        row(
            "ta-target",
            "target",
            (0.85, 0.75, 0.65),
            merge="ta",
            quantizer="epmq",
            params={"alpha": 0.1},
        ),
        q("ta-rtn-4", "ta", "rtn", 4, (0.70, 0.60, 0.50)),
        q("ta-gptq-4", "ta", "gptq", 4, (0.75, 0.65, 0.55)),
        q("ta-epmq-4", "ta", "epmq", 4, (0.84, 0.74, 0.64), params=A, x_source="quantized"),
        q(
            "ta-epmq-4-xm",
            "ta",
            "epmq",
            4,
            (0.82, 0.72, 0.62),
            params=A,
            x_source="merged",
            study="x_source",
        ),
        q(
            "ta-epmq-4-xe",
            "ta",
            "epmq",
            4,
            (0.83, 0.73, 0.63),
            params=A,
            x_source="expert",
            study="x_source",
        ),
        q(
            "ta-epmq-4-mt",
            "ta",
            "epmq",
            4,
            (0.75, 0.65, 0.56),
            params={**A, "target": "merged"},
            study="target",
        ),
        q("ta-rtn-3", "ta", "rtn", 3, (0.50, 0.40, 0.30)),
        q("ta-gptq-3", "ta", "gptq", 3, (0.60, 0.50, 0.40)),
        q("ta-epmq-3", "ta", "epmq", 3, (0.72, 0.62, 0.52), params=A, x_source="quantized"),
        row("ties", "merged", (0.85, 0.75, 0.65), merge="ties"),
        row(
            "ties-target",
            "target",
            (0.86, 0.75, 0.66),
            merge="ties",
            quantizer="epmq",
            params={"alpha": 0.1},
        ),
        q("ties-rtn-4", "ties", "rtn", 4, (0.65, 0.55, 0.45)),
        q("ties-gptq-4", "ties", "gptq", 4, (0.70, 0.60, 0.50)),
        q("ties-epmq-4", "ties", "epmq", 4, (0.74, 0.64, 0.54), params=A),
        q("ties-rtn-3", "ties", "rtn", 3, (0.45, 0.35, 0.25)),
        q("ties-gptq-3", "ties", "gptq", 3, (0.55, 0.45, 0.35)),
        q("ties-epmq-3", "ties", "epmq", 3, (0.65, 0.55, 0.45), params=A),
    ]
    sweeps: dict[str, list[SweepPoint]] = {}
    if sweep:
        curve = {0.0: 0.70, 0.01: 0.73, 0.1: 0.74, 1.0: 0.72, 10.0: 0.67}
        sweeps["alpha"] = [
            SweepPoint(
                merge="ta",
                bits=4,
                quantizer="epmq",
                params={"alpha": a, "target": target},
                average=avg,
            )
            for a, acc in curve.items()
            for target, avg in (("expert", acc), ("merged", 0.655))
        ]
    return Results(
        suite="synthetic",
        tasks=TASKS,
        settings={"alpha": 0.1, "calib": {"n": 64}},
        seed=7,
        versions=Versions(epmq="0.1.0", torch="2.13.0", transformers=None, python="3.11.0"),
        created=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        machine=Machine(cpu_count=2, platform="Linux-test"),
        timings={"merge": 1.5, "quantize": 12.25},
        rows=rows,
        sweeps=sweeps,
    )


def table_cells(markdown: str, name: str) -> list[str]:
    """The cells of the table row whose first cell is ``name``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == name:
            return cells
    raise AssertionError(f"no table row {name!r}")


def test_table_average_and_normalised_columns_match_hand_computation() -> None:
    md = render_markdown(make_results())
    header = table_cells(md, "model")
    assert header == ["model", "setting", *TASKS, "average", "normalised"]
    # ta: (80 + 70 + 60) / 3 = 70.0; normalised mean(.8/.9, .7/.8, .6/.7) = 0.87368 -> 87.4
    assert table_cells(md, "ta")[2:] == ["80.0", "70.0", "60.0", "70.0", "87.4"]
    # ta-gptq-4: average 65.0; mean(.75/.9, .65/.8, .55/.7) = 0.81052 -> 81.1
    assert table_cells(md, "ta-gptq-4")[-2:] == ["65.0", "81.1"]
    assert table_cells(md, "experts")[-2:] == ["80.0", "100.0"]
    assert table_cells(md, "pretrained")[-2:] == ["40.0", "49.5"]


def test_table_orders_rows_pretrained_experts_then_per_merge() -> None:
    md = render_markdown(make_results())
    table = md.split("## The gaps")[0].splitlines()
    names = [line.split("|")[1].strip() for line in table if line.startswith("|")]
    names = [n for n in names if n.startswith(("pre", "exp", "ta", "ties"))]
    assert names[:5] == ["pretrained", "experts", "ta", "ta-target", "ta-rtn-4"]
    assert names.index("ta-gptq-4") < names.index("ta-epmq-4") < names.index("ta-rtn-3")
    assert names.index("ta-epmq-3") < names.index("ties")


def test_gaps_section_reports_points_and_recovery() -> None:
    md = render_markdown(make_results())
    assert "- ta: experts 80.0 → merge 70.0: 10.0 points lost by merging." in md
    assert "- ta, 4-bit: merge 70.0 → GPTQ 65.0: 5.0 points lost by rounding." in md
    assert "recovering 180% of the gap; it beats the full-precision merge by 4.0 points" in md
    assert "shows no" not in md


def test_no_gap_sentence_appears_only_when_gap_is_below_threshold() -> None:
    results = make_results()
    results.rows[results.rows.index(results.row("ta"))] = row(
        "ta", "merged", (0.90, 0.80, 0.70), merge="ta"
    )
    results.rows[results.rows.index(results.row("ties-gptq-4"))] = q(
        "ties-gptq-4", "ties", "gptq", 4, (0.85, 0.75, 0.65)
    )
    md = render_markdown(results)
    assert md.count("this setting shows no merging gap") == 1
    assert "- ta: experts 80.0 → merge 80.0: this setting shows no merging gap" in md
    assert md.count("this setting shows no rounding gap") == 1
    assert "- ties, 4-bit: merge 75.0 → GPTQ 75.0: this setting shows no rounding gap" in md
    # The ties merge still has a 5-point merging gap: reported, not hidden.
    assert "- ties: experts 80.0 → merge 75.0: 5.0 points lost by merging." in md


def test_attribution_flips_between_better_merge_and_better_rounding() -> None:
    merge = row("m", "merged", (0.70, 0.70, 0.70), merge="x")
    gptq = q("g", "x", "gptq", 4, (0.60, 0.60, 0.60))
    # Target ≈ rounded E-PMQ ≫ merge: the gain is a better merge.
    target = row("t", "target", (0.80, 0.80, 0.80), merge="x")
    epmq = q("e", "x", "epmq", 4, (0.79, 0.79, 0.79))
    assert attribute(merge, target, gptq, epmq, 0.5).startswith("verdict: better merge.")
    # Target ≈ merge, E-PMQ > GPTQ: the gain is better rounding.
    target = row("t", "target", (0.70, 0.70, 0.71), merge="x")
    epmq = q("e", "x", "epmq", 4, (0.68, 0.68, 0.68))
    assert attribute(merge, target, gptq, epmq, 0.5).startswith("verdict: better rounding.")
    # Equal within the threshold, or worse: nothing to attribute.
    same = q("e", "x", "epmq", 4, (0.60, 0.60, 0.602))
    assert "no gain to attribute" in attribute(merge, target, gptq, same, 0.5)
    worse = q("e", "x", "epmq", 4, (0.50, 0.50, 0.50))
    assert "10.0 points below GPTQ" in attribute(merge, target, gptq, worse, 0.5)


def test_where_the_gain_comes_from_section_in_the_report() -> None:
    md = render_markdown(make_results())
    gain = md.split("## Where the gain comes from")[1].split("## α sweep")[0]
    ta, ties = gain.split("### ta\n")[1].split("### ties\n")
    # ta 4-bit: m=70, t=75, g=65, e=74 -> +5 from the merge, +4 from rounding.
    assert "- 4-bit: verdict: better merge. Of E-PMQ's +9.0 points over GPTQ, +5.0" in ta
    # ta 3-bit: g=50, e=62 -> +5 from the merge, +7 from rounding.
    assert "- 3-bit: verdict: better rounding. Of E-PMQ's +12.0 points" in ta
    # ties 4-bit: m=75, t=75.67, g=60, e=64 -> rounding dominates.
    assert "- 4-bit: verdict: better rounding." in ties
    # X-source variants and the merged-target ablation sit side by side.
    assert table_cells(ta, "E-PMQ, X=merged, α=0.1") == ["E-PMQ, X=merged, α=0.1", "72.0", "–"]
    assert table_cells(ta, "E-PMQ, X=expert, α=0.1")[1] == "73.0"
    assert table_cells(ta, "E-PMQ, X=quantized, α=0.1")[1:] == ["74.0", "62.0"]
    assert table_cells(ta, "E-PMQ, X=quantized, α=0.1, merged targets")[1] == "65.3"
    assert table_cells(ta, "target W* (unrounded)")[1:] == ["75.0", "75.0"]


def test_alpha_sweep_table_and_settings() -> None:
    md = render_markdown(make_results())
    sweep = md.split("## α sweep")[1].split("## Settings")[0]
    assert table_cells(sweep, "0") == ["0", "70.0", "65.5"]
    assert table_cells(sweep, "0.1") == ["0.1", "74.0", "65.5"]
    assert "GPTQ at this setting: 65.0." in sweep
    settings = md.split("## Settings")[1]
    assert "- seed: 7" in settings
    assert "torch 2.13.0" in settings and "transformers –" in settings
    assert '"n": 64' in settings
    assert table_cells(settings, "quantize") == ["quantize", "12.25"]


def test_report_without_sweep_or_epmq_says_so() -> None:
    results = make_results(sweep=False)
    results.rows = [r for r in results.rows if r.quantizer != "epmq"]
    md = render_markdown(results, plots=build_plots(results))
    assert "No 'alpha' sweep in these results." in md
    assert "No E-PMQ rows: nothing to attribute." in md
    assert "Per-task accuracy at the lowest bit width: skipped" in md
    assert "Anchor strength α sweep: skipped" in md
    assert "![Average accuracy by bit width](accuracy_by_bits.png)" in md


def test_plots_are_png_bytes_or_none() -> None:
    results = make_results()
    for png in (accuracy_by_bits(results), per_task_bars(results), alpha_sweep(results)):
        assert png is not None and png.startswith(PNG_MAGIC) and len(png) > 5000
    empty = make_results(sweep=False)
    empty.rows = [r for r in empty.rows if r.kind != "quantized"]
    assert accuracy_by_bits(empty) is None
    assert per_task_bars(empty) is None
    assert alpha_sweep(empty) is None


def test_write_report_writes_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert write_report(make_results(), out) == out / "report.md"
    names = sorted(p.name for p in out.iterdir())
    plots = ["accuracy_by_bits.png", "alpha_sweep.png", "per_task.png"]
    assert names == [*plots, "report.md", "results.json"]
    for name in ("accuracy_by_bits.png", "alpha_sweep.png", "per_task.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert Results.from_json((out / "results.json").read_text()) == make_results()
    with pytest.raises(EpmqError, match="already exists"):
        write_report(make_results(), out)
    # With force, a plot that is now skipped does not linger from the earlier run.
    write_report(make_results(sweep=False), out, force=True)
    assert not (out / "alpha_sweep.png").exists()
    assert "Anchor strength α sweep: skipped" in (out / "report.md").read_text()


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["epmq", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def test_cli_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    source = tmp_path / "results.json"
    make_results().save(source)
    out = tmp_path / "rendered"
    assert run_cli(monkeypatch, "report", str(source), "--out", str(out)) == 0
    assert (out / "report.md").read_text().startswith("# synthetic:")
    assert (out / "per_task.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()

    assert run_cli(monkeypatch, "report", str(source), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert run_cli(monkeypatch, "report", str(source), "--out", str(out), "--force") == 0

    # Default output folder: 'report' beside the results file.
    assert run_cli(monkeypatch, "report", str(source)) == 0
    assert (tmp_path / "report" / "report.md").exists()


def test_cli_report_rejects_invalid_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"suite": "x", "tasks": [')
    assert run_cli(monkeypatch, "report", str(broken), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(broken) in err and "not valid JSON" in err

    wrong = tmp_path / "wrong.json"
    data = make_results().to_json().replace('"digits": 0.7', '"digits": 7.0', 1)
    wrong.write_text(data)
    assert run_cli(monkeypatch, "report", str(wrong), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field rows.1.accuracy.digits" in err
    assert not (tmp_path / "o").exists()


def test_cli_report_missing_file_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    proc = subprocess.run(
        [sys.executable, "-m", "epmq", "report", str(missing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert f"results file {missing} does not exist" in proc.stderr


def test_a_solver_the_registry_does_not_know_still_renders() -> None:
    """Rows of any solver render (an old results file, or a solver of a newer release): its
    name stands for its label, after the registered ones."""
    results = make_results(sweep=False)
    results.rows.append(q("ta-future-4", "ta", "future", 4, (0.71, 0.61, 0.51)))
    md = render_markdown(results)
    assert table_cells(md, "ta-future-4")[1].startswith("future 4-bit")
    table = md.split("## The gaps")[0]
    assert table.index("ta-epmq-4") < table.index("ta-future-4") < table.index("ta-rtn-3")


def test_recovered_share_of_the_merging_loss() -> None:
    """(row − merge) / (experts − merge) per quantizer: ta 4-bit E-PMQ is 74 against a merge of
    70 and experts of 80, so it wins back 40 % of what merging lost; GPTQ (65) is at −50 %."""
    md = render_markdown(make_results())
    section = md.split("### Experts → merge → low bit")[1].split("###")[0]
    line = next(r for r in section.splitlines() if r.startswith("| ta | 4-bit |"))
    assert line == "| ta | 4-bit | 80.0 | 70.0 | 60.0 (-100 %) | 65.0 (-50 %) | 74.0 (+40 %) |"
