"""The layer-wise calibration engine: ``quantize_model``.

For every stage of the model (one for encoders and decoders, two for T5), and every block:

1. capture the stage's first-block inputs per task (:mod:`epmq.calib.capture`);
2. calibrate: per-task Grams of the block's linears from the model's own forward
   (:mod:`epmq.calib.statistics`);
3. solve every linear (:mod:`epmq.calib.solve`), write the weights back;
4. propagate: re-run the block to produce the next block's inputs (:mod:`epmq.calib.block`).

Where the linears' inputs come from (``x_source``): ``quantized`` (through the model
as rounded so far), ``merged`` (through the full-precision merged model), ``expert`` (as
``quantized``, plus each expert's own activations through its own blocks for the targets:
``C_i = X_i^expert X_iᵀ / n_i``; E-PMQ's default). Expert tensors are read one block at a time. A
solver declaring ``target_stream="merge"`` (``gptq-fp``) runs the full-precision merged model's
stream instead, from a snapshot of each block taken before it is solved (calib/targets.py).

Two runs need no forward pass at all: RTN without calibration data (``calib=None``: every
weight rounded alone), and ``x_source="merged"`` with a :class:`StatsCache` already filled by
an earlier run on the same merge (every block solved from the cached statistics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from epmq.atomic import write_json
from epmq.calib.block import BlockJob, Streams
from epmq.calib.capture import BlockCall, capture_stage_inputs
from epmq.calib.checkpoint import BlockCheckpoint
from epmq.calib.distributed import GramReducer
from epmq.calib.expert_weights import ExpertWeights, as_expert
from epmq.calib.offload import ActivationFiles, new_streams
from epmq.calib.onload import Placement
from epmq.calib.records import LayerRecord
from epmq.calib.solve import SolveOptions
from epmq.calib.stats_cache import StatsCache
from epmq.devices import release_freed_memory
from epmq.errors import EpmqError
from epmq.models.adapter import Batch, BlockAdapter, Stage
from epmq.quant import QuantGrid, QuantResult
from epmq.quant.solvers import Solver

logger = logging.getLogger("epmq.calib")

ExpertSource = ExpertWeights | str | Path | Mapping[str, Tensor]
BlockCallback = Callable[[str, int], None]


@dataclass
class CalibrationRun:
    """What a run produced: per-layer records, quantization results, settings."""

    layers: list[LayerRecord]
    results: dict[str, QuantResult]
    settings: dict[str, Any]
    seconds: float
    resumed_blocks: int = 0
    grams: dict[str, list[Tensor]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: settings, totals and every layer's figures."""
        return {
            "settings": self.settings,
            "seconds": self.seconds,
            "resumed_blocks": self.resumed_blocks,
            "layers": [r.to_dict() for r in self.layers],
        }

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        return write_json(path, self.to_dict())


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs a calibration; none of these settings changes the solved weights.

    Args:
        device: where the blocks run (``auto``, ``cpu``, ``cuda[:N]``; None: where the model
            is). When it is not where the model is, the model stays there and each block is
            onloaded for its lifecycle, the activations and statistics live on the device, and
            the results come back to the model's device (:mod:`epmq.calib.onload`).
        progress: show a tqdm bar over blocks.
        checkpoint_dir: save each finished block there; a rerun resumes after the last one.
        checkpoint_identity: what else the checkpoint must match (the caller's settings and
            input identities, :mod:`epmq.identity`), beside the engine's settings.
        output: write the JSON record of the run there.
        distributed: sum the statistics over the ``torch.distributed`` ranks, each holding its
            own shard of ``calib``, and share the solves (:mod:`epmq.calib.distributed`);
            ``None``: when a process group is initialised.
        stats_cache: statistics of the merged stream shared by several runs on the same
            merged model and data (``x_source="merged"`` only): the first run fills it, later
            runs are solved from it without running the model.
        keep_grams: keep every linear's per-task Grams in ``run.grams`` (keyed by parameter
            name, e.g. for a RegMean merge).
        on_block_end: called with ``(stage name, block index)`` after each finished block.
        offload_dir: keep the activations between blocks (every task's block inputs, and the
            experts' stream) in files in a private folder there, one task in memory at a
            time, deleted when the run ends (:mod:`epmq.calib.offload`); same results, slower.
    """

    device: str | torch.device | None = None
    progress: bool = True
    checkpoint_dir: str | Path | None = None
    checkpoint_identity: Mapping[str, Any] | None = None
    output: str | Path | None = None
    distributed: bool | None = None
    stats_cache: StatsCache | None = None
    keep_grams: bool = False
    on_block_end: BlockCallback | None = None
    offload_dir: str | Path | None = None


def quantize_model(
    model: nn.Module,
    adapter: BlockAdapter | None,
    calib: Mapping[str, Sequence[Batch]] | None,
    *,
    method: str | Solver,
    grid: QuantGrid | None = None,
    experts: Sequence[ExpertSource] | Mapping[str, ExpertSource] | None = None,
    x_source: str | None = None,
    task_weights: Sequence[float] | Mapping[str, float] | None = None,
    true_sequential: bool = True,
    engine: EngineOptions | None = None,
    **params: Any,
) -> CalibrationRun:
    """Quantize (or merge) ``model``'s linears in place, block by block.

    Args:
        model: the merged model (modified in place).
        adapter: the family adapter (None: :func:`epmq.models.adapter_for`).
        calib: task name → calibration batches (dicts of model inputs). Task order defines the
            order of ``experts`` and ``task_weights`` given as sequences. ``None`` (solvers
            that ignore their inputs, RTN): round every weight without data (the records then
            carry no proxy loss).
        method: a registered solver (:func:`epmq.quant.solvers.list_solvers`: ``rtn``,
            ``gptq``, ``epmq``, ``regmean``, ...), by name.
        grid: the quantization grid (as the solver declares it: required, optional — E-PMQ
            without a grid writes the continuous target W* — or none for merges).
        experts: one weight source per task (``ExpertWeights``, a safetensors folder, or a
            state dict), as a sequence in task order or a mapping by task name.
        x_source: ``quantized``, ``merged`` or ``expert`` (see module docs); None: the
            solver's default (``expert`` for E-PMQ, ``quantized`` for the others).
        task_weights: ``w_i`` per task (default 1 each).
        true_sequential: solve the adapter's linear groups one after another.
        engine: how the run is carried out (:class:`EngineOptions`: device, progress bar,
            checkpoints, distributed statistics, ...); default ``EngineOptions()``.
        **params: the solver's declared parameters (E-PMQ: ``alpha``, ``target``; GPTQ:
            ``act_order``, ``percdamp``, ``block_size``, ``static_groups``; RegMean:
            ``reduce_ratio``), validated against its declaration; defaults fill the rest.
    """
    start = time.perf_counter()
    engine = engine or EngineOptions()
    stats_cache = engine.stats_cache
    if adapter is None:
        from epmq.models import adapter_for

        adapter = adapter_for(model)
    tasks = [] if calib is None else _check_calib(calib)
    options = SolveOptions.of(method, params, grid, _task_weights(task_weights, tasks))
    solver = options.solver
    if calib is None and solver.uses_inputs:
        raise EpmqError(f"method {solver.name!r} needs calibration data (only rtn runs without)")
    x_source = x_source or solver.default_x_source
    solver.check_x_source(x_source)
    if stats_cache is not None and x_source != "merged":
        raise EpmqError("a statistics cache holds merged-stream statistics: use x_source='merged'")
    if solver.fits_norms(options.params):  # refitted norms change the merged stream
        stats_cache = None
    required = solver.needs_experts(options.params, x_source)
    expert_list = None if calib is None else _experts(experts, tasks, required=required)
    for expert in expert_list or ():
        expert.read_as(model)  # stored names as transformers renames them on loading
    check_finite_model(model)
    stages = adapter.stages(model)
    settings = _settings(options, x_source, true_sequential, tasks, calib, expert_list, stages)
    reducer = GramReducer(engine.distributed)
    reducer.check_same("settings", {**settings, "tasks": tasks})  # batch counts may differ
    if reducer.active:
        settings["world_size"] = reducer.world_size
    checkpoint = (
        BlockCheckpoint(engine.checkpoint_dir, settings, engine.checkpoint_identity)
        if engine.checkpoint_dir
        else None
    )
    if stats_cache is not None:
        stats_cache.check({"tasks": settings["tasks"], "stages": settings["stages"]})
    data = None if calib is None or (stats_cache is not None and stats_cache.complete) else calib

    model.eval()
    run = CalibrationRun([], {}, settings, 0.0)
    place = Placement.of(model, adapter, stages, engine.device)
    files = None if engine.offload_dir is None else ActivationFiles(engine.offload_dir, adapter)
    total = sum(len(adapter.blocks(model, s)) for s in stages)
    bar = tqdm(total=total, desc="calibrate", unit="block", disable=not engine.progress)
    expert_final: Streams | None = None
    try:
        upfront = {}
        if x_source == "merged" and data is not None:
            for s in stages:
                with place.stage(s):
                    upfront[s.name] = _capture(model, adapter, s, data, place.device, files)
        calls: Streams | None = None
        expert_calls: Streams | None = None
        for number, stage in enumerate(stages):
            if calls is not None:
                calls.clear()  # the previous stage's last outputs: not needed any more
            calls = expert_calls = None
            with place.stage(stage):
                if data is not None:
                    calls = upfront.pop(stage.name, None) or _capture(
                        model, adapter, stage, data, place.device, files
                    )
                if solver.second_stream(x_source) and calls is not None:
                    expert_calls = _link(model, adapter, stage, calls, expert_final, number, files)
                    if expert_final is not None:
                        expert_final.clear()  # linked: its hidden states are in expert_calls
                    expert_final = None
            for index, block in enumerate(adapter.blocks(model, stage)):
                job = BlockJob(
                    adapter, stage, index, block, tasks, expert_list, options, x_source,
                    true_sequential, engine.keep_grams, reducer if reducer.active else None,
                    stats_cache=stats_cache, reuse_outputs=files is None,
                )  # fmt: skip
                bar.set_postfix_str(f"{stage.name}.{index}")
                if checkpoint is not None and checkpoint.has(stage.name, index):
                    weights, results, records = checkpoint.load(stage.name, index)
                    with place.block(block):
                        calls, expert_calls = job.replay(calls, expert_calls, weights)
                    run.resumed_blocks += 1
                else:
                    with place.block(block):
                        outcome, calls, expert_calls = job.run(calls, expert_calls)
                    outcome = place.home(outcome)
                    weights, results, records = outcome.weights, outcome.results, outcome.records
                    run.grams.update(outcome.grams)
                    if checkpoint is not None:
                        checkpoint.save(stage.name, index, weights, results, records)
                release_freed_memory()
                run.results.update(results)
                run.layers.extend(records)
                bar.update(1)
                if engine.on_block_end is not None:
                    engine.on_block_end(stage.name, index)
            expert_final = expert_calls
    finally:
        bar.close()
        if files is not None:
            files.close()
    if stats_cache is not None:
        stats_cache.complete = all(
            stats_cache.has(s.name, i) for s in stages for i in range(len(adapter.blocks(model, s)))
        )
    run.seconds = time.perf_counter() - start
    logger.info("calibrated %d linears in %.1fs", len(run.layers), run.seconds)
    if engine.output is not None:
        run.write(engine.output)
    return run


def _capture(
    model: nn.Module,
    adapter: BlockAdapter,
    stage: Stage,
    calib: Mapping[str, Sequence[Batch]],
    device: torch.device | None,
    files: ActivationFiles | None,
) -> Streams:
    calls = new_streams(files)
    for task, batches in calib.items():  # each task stored (offloaded) before the next runs
        calls[task] = capture_stage_inputs(model, adapter, stage, batches, task, device)
    return calls


def _link(
    model: nn.Module,
    adapter: BlockAdapter,
    stage: Stage,
    calls: Streams,
    previous: Streams | None,
    number: int,
    files: ActivationFiles | None,
) -> Streams:
    """The expert stream's first-block inputs: the model's for stage 0, else linked."""
    linked = new_streams(files)
    for task, task_calls in calls.items():
        if number == 0 or previous is None:
            linked[task] = list(task_calls)
            continue
        task_linked = []
        for call, prev in zip(task_calls, previous[task], strict=True):
            hidden = adapter.hidden_states(prev.args, prev.kwargs)
            args, kwargs = adapter.link_stage(model, stage, hidden, call.args, call.kwargs)
            task_linked.append(BlockCall(args, kwargs, call.mask, call.linear_masks))
        linked[task] = task_linked
    return linked


def check_finite_model(model: nn.Module) -> None:
    """Raise :class:`EpmqError` naming the first parameter holding NaN or Inf."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise EpmqError(f"merged model tensor {name!r} holds NaN or Inf; fix the merge first")


def _check_calib(calib: Mapping[str, Sequence[Batch]]) -> list[str]:
    if not isinstance(calib, Mapping) or not calib:
        raise EpmqError("calibration data must map each task name to its batches")
    for task, batches in calib.items():
        if batches is None or len(batches) == 0:
            raise EpmqError(f"task {task!r} has no calibration data")
        for number, batch in enumerate(batches):
            if not isinstance(batch, Mapping):
                raise EpmqError(
                    f"task {task!r}: calibration batch {number} is {type(batch).__name__}, "
                    "expected a dict of model inputs"
                )
    return list(calib)


def _task_weights(
    weights: Sequence[float] | Mapping[str, float] | None, tasks: list[str]
) -> list[float] | None:
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        missing = [t for t in tasks if t not in weights]
        if missing:
            raise EpmqError(f"task_weights has no weight for task {missing[0]!r}")
        values = [float(weights[t]) for t in tasks]
    else:
        values = [float(w) for w in weights]
        if len(values) != len(tasks):
            raise EpmqError(f"task_weights has {len(values)} entries for {len(tasks)} tasks")
    for task, value in zip(tasks, values, strict=True):
        if not value >= 0 or value == float("inf"):
            raise EpmqError(f"task weight of task {task!r} must be finite and >= 0, got {value}")
    return values


def _experts(
    experts: Sequence[ExpertSource] | Mapping[str, ExpertSource] | None,
    tasks: list[str],
    *,
    required: bool,
) -> list[ExpertWeights] | None:
    if experts is None:
        if required:
            raise EpmqError("this method / x_source needs one expert per task (experts=...)")
        return None
    if isinstance(experts, Mapping) and not isinstance(experts, ExpertWeights):
        missing = [t for t in tasks if t not in experts]
        if missing:
            raise EpmqError(f"no expert given for task {missing[0]!r}")
        return [as_expert(experts[t], t) for t in tasks]
    sources = list(experts)
    if len(sources) != len(tasks):
        raise EpmqError(f"{len(sources)} experts given for {len(tasks)} tasks ({', '.join(tasks)})")
    return [as_expert(s, t) for s, t in zip(sources, tasks, strict=True)]


def _settings(
    options: SolveOptions,
    x_source: str,
    true_sequential: bool,
    tasks: list[str],
    calib: Mapping[str, Sequence[Batch]],
    experts: list[ExpertWeights] | None,
    stages: list[Stage],
) -> dict[str, Any]:
    """What determines the run's result: the solver and its parameters (flat, by their
    declared names), the grid, the X-source, the tasks and the stages."""
    grid = options.grid
    return {
        "method": options.method,
        **options.params,
        "grid": None
        if grid is None
        else {"bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric},
        "x_source": x_source,
        "true_sequential": true_sequential,
        "task_weights": options.task_weights,
        "tasks": {t: len(calib[t]) for t in tasks},
        "experts": None if experts is None else [e.name for e in experts],
        "stages": [[s.name, s.blocks_path] for s in stages],
    }
