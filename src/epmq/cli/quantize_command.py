"""``epmq quantize``: quantize a (merged) model folder layer by layer and export it.

    epmq quantize --model DIR --method {rtn,gptq,epmq} --bits 4 [--group-size 128] \\
        [--symmetric] [--act-order] [--alpha 0.1] [--x-source quantized|merged|expert] \\
        [--target expert|merged] [--expert TASK=DIR ...] --calib TASK=FILE [--calib ...] \\
        [--calib-size 128] [--max-length 128] \\
        [--format compressed-tensors|gptq|gptq-v1|dequantized] --out DIR [--force] [--resume]

Calibration files are ``.txt`` (one example per line), ``.jsonl`` or ``.csv`` (a ``text``
field/column, or ``--text-field``); see :mod:`epmq.calib.text_data`. E-PMQ (and
``--x-source expert``) needs one expert folder per calibration task. With ``--resume`` every
finished block is saved in a hidden ``.<out>.resume`` folder beside ``--out``; a rerun with
the same settings continues from there, and the folder is removed once the export is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from epmq.cli.app import app
from epmq.errors import EpmqError

METHODS = ("rtn", "gptq", "epmq")
X_SOURCES = ("quantized", "merged", "expert")
TARGETS = ("expert", "merged")
DTYPES = ("float16", "bfloat16", "float32")
MIN_BITS, MAX_BITS = 2, 8


def resume_dir(out: Path) -> Path:
    """The hidden block-checkpoint folder beside ``out`` used by ``--resume``."""
    return out.parent / f".{out.name}.resume"


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise EpmqError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_options(
    method: str, bits: int, group_size: int, alpha: float, x_source: str, target: str,
    fmt: str, dtype: str, sizes: dict[str, int],
) -> None:  # fmt: skip
    from epmq.export import get_format

    _choice("--method", method, METHODS)
    _choice("--x-source", x_source, X_SOURCES)
    _choice("--target", target, TARGETS)
    _choice("--dtype", dtype, DTYPES)
    get_format(fmt)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise EpmqError(f"--bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise EpmqError(f"--group-size must be -1 (per channel) or >= 1, got {group_size}")
    if not alpha >= 0 or alpha == float("inf"):
        raise EpmqError(f"--alpha must be a finite number >= 0, got {alpha}")
    for flag, value in sizes.items():
        if value < 1:
            raise EpmqError(f"{flag} must be >= 1, got {value}")


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


def _load(model_dir: Path) -> tuple[Any, Any, str]:
    from transformers.utils import logging as hf_logging

    from epmq.models.registry import detect_family, load_model

    family = detect_family(model_dir)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, adapter = load_model(model_dir)
    except OSError as exc:
        raise EpmqError(f"cannot load the model in {model_dir}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, adapter, family


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
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ act-order.")] = False,
    static_groups: Annotated[
        bool, typer.Option("--static-groups", help="Fit all groups up front (act-order).")
    ] = False,
    alpha: Annotated[float, typer.Option("--alpha", help="E-PMQ anchor strength α.")] = 0.1,
    x_source: Annotated[
        str, typer.Option("--x-source", help="Layer inputs: quantized, merged or expert.")
    ] = "quantized",
    target: Annotated[
        str, typer.Option("--target", help="E-PMQ targets: expert or merged (ablation).")
    ] = "expert",
    expert: Annotated[
        list[str] | None, typer.Option("--expert", help="TASK=DIR expert folder; repeat.")
    ] = None,
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
) -> None:
    """Quantize a merged model's linear layers (RTN, GPTQ or E-PMQ) and export --out."""
    from epmq.atomic import refuse_existing, refuse_overlap
    from epmq.calib.text_data import parse_task_paths

    for flag, value in (("--model", model), ("--method", method), ("--bits", bits), ("--out", out)):
        if value is None:
            raise EpmqError(f"{flag} is required")
    if not calib:
        raise EpmqError("--calib is required (repeat it once per task: --calib TASK=FILE)")
    assert model is not None and method is not None and bits is not None and out is not None
    sizes = {"--calib-size": calib_size, "--max-length": max_length, "--batch-size": batch_size}
    _check_options(method, bits, group_size, alpha, x_source, target, fmt, dtype, sizes)
    if not model.is_dir():
        raise EpmqError(f"--model folder {model} does not exist")
    calib_files = parse_task_paths(calib, "--calib")
    expert_dirs = parse_task_paths(expert or [], "--expert")
    inputs = [("--model folder", model), ("--tokenizer folder", tokenizer or model)]
    inputs += [(f"--calib {task} file", file) for task, file in calib_files.items()]
    inputs += [(f"--expert {task} folder", folder) for task, folder in expert_dirs.items()]
    refuse_overlap(out, inputs)
    refuse_existing(out, force)
    needs = method == "epmq" or x_source == "expert"
    why = "method epmq" if method == "epmq" else "--x-source expert"
    _check_tasks(calib_files, expert_dirs, needs, why)
    if act_order and fmt == "compressed-tensors" and group_size > 0 and not static_groups:
        from epmq.export.compressed_tensors_format import ACT_ORDER_REASON

        raise EpmqError(
            f"--act-order with groups cannot be stored as compressed-tensors ({ACT_ORDER_REASON}); "
            "add --static-groups, or use --format gptq, which stores g_idx"
        )
    run_quantize(
        model, out, method=method, bits=bits, group_size=group_size, symmetric=symmetric,
        act_order=act_order, static_groups=static_groups, alpha=alpha, x_source=x_source,
        target=target, calib_files=calib_files, expert_dirs=expert_dirs, calib_size=calib_size,
        max_length=max_length, batch_size=batch_size, text_field=text_field,
        tokenizer_dir=tokenizer or model, seed=seed, fmt=fmt, dtype=dtype, force=force,
        resume=resume, progress=progress,
    )  # fmt: skip


def run_quantize(
    model_dir: Path, out: Path, *, method: str, bits: int, group_size: int, symmetric: bool,
    act_order: bool, static_groups: bool, alpha: float, x_source: str, target: str,
    calib_files: dict[str, Path], expert_dirs: dict[str, Path], calib_size: int,
    max_length: int, batch_size: int, text_field: str | None, tokenizer_dir: Path, seed: int,
    fmt: str, dtype: str, force: bool, resume: bool, progress: bool,
) -> None:  # fmt: skip
    """Load, calibrate, quantize and export (the options are checked by the command)."""
    import torch

    from epmq.calib import SafetensorsExpert, quantize_model
    from epmq.calib.text_data import load_calibration, load_tokenizer, model_input_names
    from epmq.export import export_checkpoint
    from epmq.models.adapter import check_group_sizes
    from epmq.quant import QuantGrid

    model, adapter, family = _load(model_dir)
    n_linears = check_group_sizes(model, adapter, [group_size], "--group-size")
    tok = load_tokenizer(tokenizer_dir)
    batches, calib_info = load_calibration(
        tok, calib_files, size=calib_size, max_length=max_length, batch_size=batch_size,
        seed=seed, field=text_field, input_names=model_input_names(model),
    )  # fmt: skip
    experts = {t: SafetensorsExpert(d, name=t) for t, d in expert_dirs.items()} or None
    checkpoint = resume_dir(out) if resume else None
    typer.echo(f"quantizing {n_linears} linear layers of {model_dir} ({family}) with {method}")
    run = quantize_model(
        model, adapter, batches, method=method,
        grid=QuantGrid(bits, group_size, symmetric), experts=experts, alpha=alpha,
        x_source=x_source, target=target, act_order=act_order, static_groups=static_groups,
        checkpoint_dir=checkpoint, progress=progress,
    )  # fmt: skip
    record = {
        "command": "quantize",
        "model": str(model_dir),
        "family": family,
        "method": method,
        "settings": run.settings,
        "calibration": {
            "seed": seed,
            "max_length": max_length,
            "batch_size": batch_size,
            "tasks": calib_info,
        },
        "experts": {t: str(d) for t, d in expert_dirs.items()},
        "seconds": run.seconds,
        "resumed_blocks": run.resumed_blocks,
        "layers": [layer.to_dict() for layer in run.layers],
    }
    export_checkpoint(
        model, run.results, out, format=fmt, base_dir=tokenizer_dir, record=record,
        force=force, dtype=getattr(torch, dtype),
    )  # fmt: skip
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
