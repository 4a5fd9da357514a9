"""The Typer application that every ``epmq`` sub-command registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="epmq",
    help="Post-merge quantization: merge expert models, then quantize them with E-PMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Post-merge quantization: merge expert models, then quantize them with E-PMQ."""
