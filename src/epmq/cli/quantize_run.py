"""The work behind ``epmq quantize`` once its options are checked: load the model and the
calibration data, calibrate block by block (resumable), export (:func:`run_quantize`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from epmq.errors import EpmqError

if TYPE_CHECKING:
    import torch

    from epmq.calib import EngineOptions, SolveOptions


def resume_dir(out: Path) -> Path:
    """The hidden block-checkpoint folder beside ``out`` used by ``--resume``."""
    return out.parent / f".{out.name}.resume"


def _load(model_dir: Path) -> tuple[Any, Any, str]:
    """The model (loaded quietly and checked, :func:`epmq.models.folder.from_folder`)."""
    from epmq.models.registry import detect_family, load_model

    family = detect_family(model_dir)
    try:
        model, adapter = load_model(model_dir)
    except OSError as exc:
        raise EpmqError(f"cannot load the model in {model_dir}: {exc}") from None
    return model, adapter, family


@dataclass(frozen=True)
class CalibrationFiles:
    """Where the calibration text and the experts come from, and how it is sampled."""

    files: dict[str, Path]
    experts: dict[str, Path]
    size: int
    max_length: int
    batch_size: int
    text_field: str | None
    tokenizer: Path
    seed: int


@dataclass(frozen=True)
class ExportSettings:
    """How the quantized model is written: format, float type of the rest, overwrite."""

    format: str
    dtype: str
    force: bool


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs: X-source, resume, progress, device, the model's dtype, the
    ``--task-weights`` setting (calib/task_weights.py) and ``--offload-dir``."""

    x_source: str
    resume: bool
    progress: bool
    device: torch.device | None
    model_dtype: torch.dtype | None
    task_weights: str | dict[str, float] = "uniform"
    offload_dir: Path | None = None

    def options(self, **options: Any) -> EngineOptions:
        """The engine's options for one calibration: device and offloading, plus ``options``."""
        from epmq.calib import EngineOptions

        return EngineOptions(device=self.device, offload_dir=self.offload_dir, **options)


def _checkpoint_identity(
    model_dir: Path, data: CalibrationFiles, engine: EngineSettings
) -> dict[str, Any]:
    """What a resumed run must share with the stopped one beside the engine's settings: the
    sampling settings and the identities of every input (the device and export are free)."""
    from epmq.identity import input_identities

    inputs = [("--model folder", model_dir)]
    if data.tokenizer != model_dir:
        inputs.append(("--tokenizer folder", data.tokenizer))
    inputs += [(f"--calib {task} file", file) for task, file in data.files.items()]
    inputs += [(f"--expert {task} folder", folder) for task, folder in data.experts.items()]
    return {
        "--calib-size": data.size, "--max-length": data.max_length, "--seed": data.seed,
        "--batch-size": data.batch_size, "--text-field": data.text_field,
        "--model-dtype": str(engine.model_dtype), **input_identities(inputs),
    }  # fmt: skip


def _task_weights(
    model: Any, batches: Any, data: CalibrationFiles, engine: EngineSettings, calibrate: Any
) -> list[float] | None:
    """The weights of ``--task-weights`` in task order, measured on every calibration batch
    (before a distributed run shards them); ``auto``'s rounds quantize copies of the model."""
    import copy

    from epmq.calib.task_weights import TaskWeighting

    def load_expert(task: str) -> Any:
        expert = _load(data.experts[task])[0]
        return expert if engine.model_dtype is None else expert.to(engine.model_dtype)

    def build(weights: list[float]) -> Any:
        target = copy.deepcopy(model)
        calibrate(target, weights, engine.options(progress=False))
        return target

    weighting = TaskWeighting(batches, load_expert, device=engine.device)
    chosen = weighting.choose(engine.task_weights, "model", model, build)
    if chosen.setting == "auto":
        shown = ", ".join(f"{t}={w:.3f}" for t, w in chosen.weights.items())
        typer.echo(f"task weights (auto): {shown}")
    return chosen.values


def run_quantize(
    model_dir: Path,
    out: Path,
    options: SolveOptions,
    data: CalibrationFiles,
    export: ExportSettings,
    engine: EngineSettings,
) -> None:
    """Load, calibrate, quantize and export (the options are checked by the command)."""
    import torch

    from epmq.calib import SafetensorsExpert, quantize_model
    from epmq.calib.checkpoint import remove_checkpoint
    from epmq.calib.distributed import launched_group, shard
    from epmq.calib.text_data import load_calibration, load_tokenizer, model_input_names
    from epmq.export import export_checkpoint
    from epmq.models.adapter import check_group_sizes
    from epmq.models.folder import check_vocabulary

    assert options.grid is not None
    model, adapter, family = _load(model_dir)
    if engine.model_dtype is not None:
        model = model.to(engine.model_dtype)
    n_linears = check_group_sizes(model, adapter, [options.grid.group_size], "--group-size")
    tokenizer = load_tokenizer(data.tokenizer)
    check_vocabulary(model, tokenizer, model_dir, data.tokenizer)
    batches, calib_info = load_calibration(
        tokenizer, data.files, size=data.size, max_length=data.max_length,
        batch_size=data.batch_size, seed=data.seed, field=data.text_field,
        input_names=model_input_names(model),
    )  # fmt: skip
    experts = {t: SafetensorsExpert(d, name=t) for t, d in data.experts.items()} or None
    method = options.method

    def calibrate(target: Any, weights: list[float] | None, settings: EngineOptions) -> Any:
        return quantize_model(
            target, adapter, batches, method=options.solver, grid=options.grid,
            experts=experts, x_source=engine.x_source, task_weights=weights,
            **options.params, engine=settings,
        )  # fmt: skip

    weights = _task_weights(model, batches, data, engine, calibrate)
    identity = _checkpoint_identity(model_dir, data, engine) if engine.resume else None
    with launched_group(engine.device) as (rank, world):  # under torchrun: one shard per rank
        checkpoint = resume_dir(out) if engine.resume else None
        if checkpoint is None and rank == 0:
            remove_checkpoint(resume_dir(out))
        if world > 1:
            batches = shard(batches, rank, world)
            checkpoint = None if checkpoint is None else checkpoint / f"rank{rank}"
        if rank == 0:
            typer.echo(
                f"quantizing {n_linears} linear layers of {model_dir} ({family}) with {method}"
                + (f" on {world} ranks" if world > 1 else "")
            )
        run = calibrate(
            model,
            weights,
            engine.options(
                checkpoint_dir=checkpoint,
                checkpoint_identity=identity,
                progress=engine.progress and rank == 0,
            ),
        )
        if rank != 0:  # every rank holds the same solved model: rank 0 exports it
            return
        record = {
            "command": "quantize",
            "model": str(model_dir),
            "family": family,
            "method": method,
            "settings": run.settings,
            "calibration": {
                "seed": data.seed,
                "max_length": data.max_length,
                "batch_size": data.batch_size,
                "tasks": calib_info,
            },
            "experts": {t: str(d) for t, d in data.experts.items()},
            "seconds": run.seconds,
            "resumed_blocks": run.resumed_blocks,
            "layers": [layer.to_dict() for layer in run.layers],
        }
        export_checkpoint(
            model, run.results, out, format=export.format, base_dir=data.tokenizer,
            record=record, force=export.force, dtype=getattr(torch, export.dtype),
        )  # fmt: skip
        if engine.resume:
            shutil.rmtree(resume_dir(out), ignore_errors=True)
