"""``epmq run CONFIG.yaml``: a whole experiment from one config file."""

from __future__ import annotations

from pathlib import Path

import typer

from epmq.cli.app import app


@app.command("run")
def run(
    config: Path = typer.Argument(..., help="Pipeline config (YAML), see examples/configs/."),
    quick: bool = typer.Option(False, "--quick", help="Built-in suites: fewer steps/examples."),
    cache_dir: Path | None = typer.Option(None, help="Cache root for suite experts."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output folder."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a stopped run from its last finished model."
    ),
    check: bool = typer.Option(False, "--check", help="Only validate the config and exit."),
    device: str | None = typer.Option(
        None, help="Where to calibrate and evaluate: auto, cpu, cuda[:N] (overrides 'device')."
    ),
) -> None:
    """Merge, quantize, evaluate and report, as CONFIG describes."""
    from epmq.experiment.config import load_config, parse_config

    parsed = load_config(config)
    if device is not None:
        parsed = parse_config({**parsed.model_dump(mode="json"), "device": device}, "--device")
    if check:
        from epmq.experiment.session import check_models

        check_models(parsed)
        typer.echo(f"{config}: valid ({len(parsed.merges)} merges)")
        return
    from epmq.experiment.session import run_session

    run_session(parsed, quick=quick, cache_dir=cache_dir, force=force, resume=resume)
