"""``epmq merge``: merge expert checkpoint folders into one model folder.

    epmq merge --base DIR --expert DIR [--expert DIR ...] --method ties \\
        --param density=0.2 --param scale=0.3 --include 'pattern' --exclude 'pattern' \\
        --out DIR [--force]

Patterns are shell-style globs on parameter names. ``epmq merge --list-methods`` prints every
method with its parameters and defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from epmq.cli.app import app
from epmq.errors import EpmqError


def _describe_all() -> str:
    from epmq.merging import get_method, list_methods

    return "\n".join(get_method(name).describe() for name in list_methods())


@app.command("merge")
def merge_command(
    base: Annotated[Path | None, typer.Option("--base", help="Base (pretrained) folder.")] = None,
    expert: Annotated[
        list[Path] | None, typer.Option("--expert", help="Expert folder; repeat per expert.")
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="Merge method (see --list-methods).")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="Method parameter name=value; repeat.")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Glob of parameters to merge; repeat.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Glob of parameters kept from base.")
    ] = None,
    grams: Annotated[
        Path | None, typer.Option("--grams", help="Per-task Grams file (regmean).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    list_methods: Annotated[
        bool, typer.Option("--list-methods", help="Print methods and parameters, then exit.")
    ] = False,
) -> None:
    """Merge expert checkpoints (safetensors folders) tensor by tensor into --out."""
    if list_methods:
        typer.echo(_describe_all())
        return
    for flag, value in (("--base", base), ("--method", method), ("--out", out)):
        if value is None:
            raise EpmqError(f"{flag} is required")
    if not expert:
        raise EpmqError("--expert is required (repeat it once per expert)")

    from epmq.merging import get_method, merge_checkpoints
    from epmq.merging.grams import GramFile

    assert method is not None and base is not None and out is not None
    params = get_method(method).parse(param or [])
    written = merge_checkpoints(
        base,
        expert,
        out,
        method,
        include=include or None,
        exclude=exclude or None,
        grams=GramFile(grams) if grams is not None else None,
        force=force,
        **params,
    )
    typer.echo(f"wrote {written} ({method}, {len(expert)} experts)")
