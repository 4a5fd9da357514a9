"""``epmq merge``: merge expert checkpoint folders into one model folder.

    epmq merge --base DIR --expert DIR [--expert DIR ...] --method ties \\
        --param density=0.2 --param scale=0.3 --include 'pattern' --exclude 'pattern' \\
        --out DIR [--force]
    epmq merge --base DIR --expert A --expert B --method regmean \\
        --calib a=a.txt --calib b=b.txt --out DIR      # Grams from calibration text

Patterns are shell-style globs on parameter names. ``epmq merge --list-methods`` prints every
method with its parameters and defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    calib: Annotated[
        list[str] | None,
        typer.Option(
            "--calib", help="TASK=FILE per expert, in order: a data-driven merge (regmean)."
        ),
    ] = None,
    calib_size: Annotated[int, typer.Option("--calib-size", help="Examples per task.")] = 128,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 128,
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
    if calib:
        from epmq.calib.data_merge import merge_with_data

        batches = _calibration(base, calib, calib_size, max_length)
        written = merge_with_data(base, expert, out, method, batches, force=force, **params)
        typer.echo(f"wrote {written} ({method} from calibration data, {len(expert)} experts)")
        return
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


def _calibration(base: Path, calib: list[str], size: int, max_length: int) -> Any:
    """The ``--calib`` files (one per expert) read, sampled and tokenized with the base's
    tokenizer."""
    from epmq.calib.text_data import load_calibration, load_tokenizer, parse_task_paths

    for flag, value in (("--calib-size", size), ("--max-length", max_length)):
        if value < 1:
            raise EpmqError(f"{flag} must be >= 1, got {value}")
    files = parse_task_paths(calib, "--calib")
    for task, file in files.items():
        if not file.is_file():
            raise EpmqError(f"--calib {task}: file {file} does not exist")
    batches, _ = load_calibration(
        load_tokenizer(base), files, size=size, max_length=max_length, batch_size=8
    )
    return batches
