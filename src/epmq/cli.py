"""The ``epmq`` command line.

Each sub-command is a thin shell over the Python API. User mistakes raise
:class:`epmq.errors.EpmqError`; :func:`main` prints them as one line and exits with code 2.
"""

from __future__ import annotations

import sys

import typer

from epmq import __version__
from epmq.errors import EpmqError

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


@app.command()
def version() -> None:
    """Print the installed epmq version."""
    typer.echo(__version__)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except EpmqError as err:
        print(f"epmq: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
