"""``epmq quantize``: quantize a (merged) model folder layer by layer and export it.

    epmq quantize --model DIR --method NAME --bits 4 [--group-size 128] [--symmetric] \\
        [--param name=value ...] [--x-source quantized|merged|expert] \\
        [--expert TASK=DIR ...] --calib TASK=FILE [--calib ...] [--calib-size 128] \\
        [--task-weights uniform|auto|TASK=W,TASK=W] \\
        [--max-length 128] [--format compressed-tensors|gptq|gptq-v1|dequantized] \\
        --out DIR [--force] [--resume]

``--method`` is any registered solver that rounds (``epmq quantize --list-methods`` prints
each with its parameters); ``--param`` sets one of the solver's parameters, and ``--alpha``,
``--target``, ``--act-order``, ``--static-groups`` are short for the parameters of those names.

Calibration files are ``.txt`` (one example per line), ``.jsonl`` or ``.csv`` (a ``text``
field/column, or ``--text-field``); see :mod:`epmq.calib.text_data`. E-PMQ (and
``--x-source expert``) needs one expert folder per calibration task. With ``--resume`` every
finished block is saved in a hidden ``.<out>.resume`` folder beside ``--out``; a rerun with
the same settings continues from there, and the folder is removed once the export is written
(:mod:`epmq.cli.quantize_run` does the work once the options are checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from epmq.cli.app import app
from epmq.cli.quantize_run import (
    CalibrationFiles,
    EngineSettings,
    ExportSettings,
    run_quantize,
)
from epmq.errors import EpmqError

if TYPE_CHECKING:
    import torch


DTYPES = ("float16", "bfloat16", "float32")
MIN_BITS, MAX_BITS = 2, 8


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise EpmqError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_options(bits: int, group_size: int, fmt: str, dtype: str, sizes: dict) -> None:
    from epmq.export import get_format

    _choice("--dtype", dtype, DTYPES)
    get_format(fmt)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise EpmqError(f"--bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise EpmqError(f"--group-size must be -1 (per channel) or >= 1, got {group_size}")
    for flag, value in sizes.items():
        if value < 1:
            raise EpmqError(f"{flag} must be >= 1, got {value}")


def _solve_options(
    method: str, assignments: list[str], shorthands: dict[str, Any], grid: Any
) -> Any:
    """The solver's validated options from ``--method``, ``--param`` and the shorthands."""
    from epmq.calib import SolveOptions
    from epmq.quant.solvers import get_solver, list_solvers

    solver = get_solver(method)
    if not solver.rounds:
        raise EpmqError(
            f"--method {method!r} does not round; choose one of "
            f"{', '.join(list_solvers(rounding=True))}"
        )
    params = {name: value for name, value in shorthands.items() if value is not None}
    params.update(solver.parse(assignments))
    return SolveOptions.of(solver, params, grid)


def _task_weights(text: str, tasks: list[str]) -> str | dict[str, float]:
    """``--task-weights``: ``uniform``, ``auto`` or ``TASK=W,TASK=W`` (a task not named
    weighs 1), checked against the calibration tasks (calib/task_weights.py)."""
    from epmq.calib.task_weights import AUTO, UNIFORM, check_task_weights

    setting: str | dict[str, float] = text
    if text not in (UNIFORM, AUTO):
        setting = {}
        for part in text.split(","):
            task, sep, value = (piece.strip() for piece in part.partition("="))
            try:
                if not (sep and task):
                    raise ValueError(part)
                setting[task] = float(value)
            except ValueError:
                raise EpmqError(
                    f"--task-weights must be uniform, auto or TASK=W[,TASK=W...], got {part!r}"
                ) from None
    try:
        check_task_weights(setting, tasks)
    except EpmqError as exc:
        raise EpmqError(f"--task-weights: {exc}") from None
    return setting


def _describe_solvers() -> str:
    from epmq.quant.solvers import get_solver, list_solvers

    return "\n".join(get_solver(name).describe() for name in list_solvers(rounding=True))


def _check_tasks(
    calib: dict[str, Path], experts: dict[str, Path], needs_experts: bool, why: str
) -> None:
    for task, file in calib.items():
        if not file.is_file():
            raise EpmqError(f"--calib {task}: file {file} does not exist")
    for task, folder in experts.items():
        if task not in calib:
            raise EpmqError(f"--expert {task}: no calibration data for task {task!r} (--calib)")
        if not folder.is_dir():
            raise EpmqError(f"--expert {task}: folder {folder} does not exist")
    if needs_experts:
        for task in calib:
            if task not in experts:
                raise EpmqError(f"{why} needs an expert for task {task!r} (--expert {task}=DIR)")


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def _model_dtype(name: str) -> torch.dtype:
    """``--model-dtype`` as a torch dtype (one line naming the option otherwise)."""
    import torch

    if name not in MODEL_DTYPES:
        raise EpmqError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)}, got {name!r}")
    return getattr(torch, name)


@app.command("quantize")
def quantize_command(
    model: Annotated[
        Path | None, typer.Option("--model", help="(Merged) Hugging Face model folder.")
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help="rtn, gptq or epmq.")] = None,
    bits: Annotated[int | None, typer.Option("--bits", help="Weight bits (2..8).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output checkpoint folder.")] = None,
    calib: Annotated[
        list[str] | None,
        typer.Option("--calib", help="TASK=FILE (.txt/.jsonl/.csv); repeat per task."),
    ] = None,
    group_size: Annotated[
        int, typer.Option("--group-size", help="Input columns per group (-1: per channel).")
    ] = 128,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="Symmetric grid.")] = False,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="Solver parameter name=value; repeat.")
    ] = None,
    act_order: Annotated[
        bool | None,
        typer.Option("--act-order/--no-act-order", help="Short for --param act_order=..."),
    ] = None,
    static_groups: Annotated[
        bool | None,
        typer.Option(
            "--static-groups/--no-static-groups", help="Short for --param static_groups=..."
        ),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="Short for --param alpha=A (E-PMQ).")
    ] = None,
    x_source: Annotated[
        str | None,
        typer.Option(
            "--x-source",
            help="Layer inputs: quantized, merged or expert (default: the method's own; "
            "E-PMQ: expert).",
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="Short for --param target=T (E-PMQ).")
    ] = None,
    expert: Annotated[
        list[str] | None, typer.Option("--expert", help="TASK=DIR expert folder; repeat.")
    ] = None,
    task_weights: Annotated[
        str,
        typer.Option(
            "--task-weights",
            help="Per-task weights: uniform, auto (by each expert's distance from the model) "
            "or TASK=W,TASK=W (a task not named weighs 1).",
        ),
    ] = "uniform",
    calib_size: Annotated[int, typer.Option("--calib-size", help="Examples per task.")] = 128,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration batch.")] = 8,
    text_field: Annotated[
        str | None, typer.Option("--text-field", help="Text field of .jsonl/.csv files.")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="Tokenizer folder (default: --model).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Calibration sampling seed.")] = 0,
    fmt: Annotated[
        str,
        typer.Option("--format", help="compressed-tensors, gptq, gptq-v1 or dequantized."),
    ] = "compressed-tensors",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Float type of scales and other tensors.")
    ] = "float16",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Save finished blocks; continue a stopped run.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    device: Annotated[
        str, typer.Option("--device", help="Where blocks run: auto, cpu, cuda[:N].")
    ] = "auto",
    model_dtype: Annotated[
        str,
        typer.Option("--model-dtype", help="Hold the model in float32, bfloat16 or float16."),
    ] = "float32",
    offload_dir: Annotated[
        Path | None,
        typer.Option("--offload-dir", help="Keep activations between blocks in files there."),
    ] = None,
    list_methods: Annotated[
        bool, typer.Option("--list-methods", help="Print the solvers and parameters, then exit.")
    ] = False,
) -> None:
    """Quantize a merged model's linear layers (RTN, GPTQ, E-PMQ, ...) and export --out."""
    from epmq.atomic import refuse_existing, refuse_overlap
    from epmq.calib.text_data import parse_task_paths
    from epmq.devices import resolve_device
    from epmq.quant import QuantGrid
    from epmq.quant.solvers.registry import X_SOURCES

    if list_methods:
        typer.echo(_describe_solvers())
        return
    for flag, value in (("--model", model), ("--method", method), ("--bits", bits), ("--out", out)):
        if value is None:
            raise EpmqError(f"{flag} is required")
    if not calib:
        raise EpmqError("--calib is required (repeat it once per task: --calib TASK=FILE)")
    assert model is not None and method is not None and bits is not None and out is not None
    sizes = {"--calib-size": calib_size, "--max-length": max_length, "--batch-size": batch_size}
    _check_options(bits, group_size, fmt, dtype, sizes)
    shorthands = {"act_order": act_order, "static_groups": static_groups, "alpha": alpha}
    shorthands["target"] = target
    options = _solve_options(
        method, param or [], shorthands, QuantGrid(bits, group_size, symmetric)
    )
    x_source = x_source or options.solver.default_x_source
    options.solver.check_x_source(_choice("--x-source", x_source, X_SOURCES))
    if not model.is_dir():
        raise EpmqError(f"--model folder {model} does not exist")
    calib_files = parse_task_paths(calib, "--calib")
    expert_dirs = parse_task_paths(expert or [], "--expert")
    inputs = [("--model folder", model), ("--tokenizer folder", tokenizer or model)]
    inputs += [(f"--calib {task} file", file) for task, file in calib_files.items()]
    inputs += [(f"--expert {task} folder", folder) for task, folder in expert_dirs.items()]
    refuse_overlap(out, inputs)
    refuse_existing(out, force)
    norms = options.solver.fits_norms(options.params)
    needs = options.solver.needs_experts(options.params, x_source)
    why = f"method {method}" if options.solver.reads_experts else "--x-source expert"
    why = "--param norm_correction=true" if norms and not options.solver.reads_experts else why
    weights = _task_weights(task_weights, list(calib_files))
    if weights == "auto" and not needs:
        needs, why = True, "--task-weights auto"
    _check_tasks(calib_files, expert_dirs, needs, why)
    grouped_act_order = options.params.get("act_order") and group_size > 0
    if grouped_act_order and fmt == "compressed-tensors" and not options.params["static_groups"]:
        from epmq.export.compressed_tensors_format import ACT_ORDER_REASON

        raise EpmqError(
            f"--act-order with groups cannot be stored as compressed-tensors ({ACT_ORDER_REASON}); "
            "add --static-groups, or use --format gptq, which stores g_idx"
        )
    data = CalibrationFiles(
        calib_files, expert_dirs, calib_size, max_length, batch_size, text_field,
        tokenizer or model, seed,
    )  # fmt: skip
    engine = EngineSettings(
        x_source, resume, progress, resolve_device(device), _model_dtype(model_dtype), weights,
        offload_dir,
    )  # fmt: skip
    run_quantize(model, out, options, data, ExportSettings(fmt, dtype, force), engine)
