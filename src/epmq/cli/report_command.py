"""``epmq report RESULTS.json``: re-render the report (Markdown, JSON, plots) from results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from epmq.cli.app import app


@app.command("report")
def report(
    results_json: Annotated[
        Path, typer.Argument(metavar="RESULTS.json", help="An experiment's results JSON file.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: 'report' beside RESULTS_JSON)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
) -> None:
    """Write report.md, results.json and PNG plots from a results JSON file."""
    from epmq.eval.report import REPORT_FILE, write_report
    from epmq.eval.results import load_results

    results = load_results(results_json)
    out_dir = out if out is not None else results_json.parent / "report"
    write_report(results, out_dir, force=force)
    typer.echo(f"wrote {out_dir / REPORT_FILE}")
