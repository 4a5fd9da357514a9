"""``epmq version``: print the installed version."""

from __future__ import annotations

import typer

from epmq import __version__
from epmq.cli.app import app


@app.command()
def version() -> None:
    """Print the installed epmq version."""
    typer.echo(__version__)
