"""Run an experiment: merge the experts, quantize every merge, evaluate every model, report.

The loop follows FusionBench's program (model pool → algorithm → task pool → report), for
post-merge quantization: for each merge of the plan, build the full-precision merge once, then
every quantized variant from a fresh copy of it through the calibration engine, evaluating each
model on every task as soon as it exists (so memory holds one merge and one variant at a time).

Work that does not depend on the variant is done once: RTN rounds the weights without
calibration data, the experts' tensors are read and checked once for the whole experiment
(:class:`epmq.calib.expert_cache.CachedExpert`), and the variants of a merge that read their
inputs from the full-precision merge (``x_source="merged"``) are solved from one
:class:`epmq.calib.stats_cache.StatsCache` filled by the first of them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epmq.calib.engine import CalibrationRun, EngineOptions
from epmq.calib.expert_cache import CacheBudget, CachedExpert
from epmq.calib.expert_weights import ExpertWeights
from epmq.calib.onload import Onloaded
from epmq.calib.stats_cache import StatsCache
from epmq.calib.task_weights import ChosenWeights, TaskWeighting, check_task_weights
from epmq.devices import resolve_device
from epmq.errors import EpmqError
from epmq.eval.results import ALPHA_SWEEP, Results, Row, TaskWeights, average
from epmq.experiment.config import ExperimentConfig, MergeSpec
from epmq.experiment.journal import Journal
from epmq.experiment.plan import (
    SWEEP,
    Variant,
    collect_sweep_from_rows,
    plan_experiment,
    sweep_point,
)
from epmq.experiment.workload import Workload
from epmq.models import adapter_for
from epmq.models.adapter import check_group_sizes
from epmq.quant.solvers import get_solver

log = logging.getLogger(__name__)

Announce = Callable[[str], None]
# Called with every model built (merged, target, quantized) before its evaluation, with the
# calibration run that produced it (None for the full-precision merge).
OnModel = Callable[[Variant, nn.Module, CalibrationRun | None], None]


def run_experiment(
    config: ExperimentConfig,
    workload: Workload,
    *,
    progress: bool = False,
    announce: Announce = print,
    on_model: OnModel | None = None,
    journal: Journal | None = None,
) -> Results:
    """Evaluate every variant of ``config`` on ``workload`` and return the results.

    With a ``journal`` every finished model is recorded as it is done, and the models the
    journal already holds (a stopped run being resumed) are taken from it, not rebuilt.
    """
    torch.manual_seed(config.seed)
    results = Results.new(
        suite=workload.name,
        tasks=workload.tasks,
        settings={"config": config.model_dump(mode="json"), "workload": workload.settings},
        seed=config.seed,
    )
    results.timings.update(workload.timings)
    started = time.perf_counter()

    base = _load(config, workload, workload.base_dir)
    if any(v.kind == "quantized" for v in plan_experiment(config)):  # before any model is built
        sizes = config.quantization.group_sizes
        check_group_sizes(base, adapter_for(base), sizes, config.where("quantization.group_sizes"))
    if workload.probe_heads:
        _add_row(
            results,
            Row(name=workload.pretrained_name, kind="pretrained", accuracy={}),
            lambda: _evaluate(config, workload, base, workload.probe_heads or {}, workload.tasks),
            announce,
            journal=journal,
        )
    _add_row(
        results,
        Row(name="experts", kind="expert", accuracy={}),
        lambda: _expert_accuracy(config, workload),
        announce,
        journal=journal,
    )

    variants = plan_experiment(config)
    sources = _expert_sources(workload)
    weighting = _task_weighting(config, workload)
    for merge in config.merges:
        todo = [v for v in variants if v.merge == merge.method]
        pending = [v for v in todo if journal is None or not journal.has(v.name)]
        merged: nn.Module | None = None  # built only if a model of this merge is still to do
        cache: StatsCache | None = None
        for variant in todo:
            if variant not in pending:
                assert journal is not None
                _restore(results, variant, journal, announce)
                continue
            if merged is None:
                merged = _build_merge(merge, base, workload, config, progress, sources)
                cache = StatsCache() if sum(_reads_merged(v) for v in pending) > 1 else None
            clock = time.perf_counter()
            model, run, chosen = (
                (merged, None, None)
                if variant.kind == "merged"
                else _weighted_copy(
                    merged, variant, workload, config, progress, cache, sources, weighting
                )
            )
            _tally(results, "variants_build", time.perf_counter() - clock)
            if on_model is not None:
                on_model(variant, model, run)
            evaluating = time.perf_counter()
            accuracy = _evaluate(config, workload, model, workload.heads, workload.tasks)
            _tally(results, "variants_evaluate", time.perf_counter() - evaluating)
            seconds = time.perf_counter() - clock
            if variant.sweep == SWEEP:
                point = sweep_point(variant, config, accuracy)
                results.sweeps.setdefault(ALPHA_SWEEP, []).append(point)
                announce(f"  sweep {variant.name}: {100 * _mean(accuracy):.1f}")
                if journal is not None:
                    journal.add_point(variant.name, point)
            else:
                row = _row(variant, config, seconds, chosen)
                _add_row(results, row, lambda a=accuracy: a, announce, seconds, journal=journal)
        if cache is not None:
            cache.close()
    collect_sweep_from_rows(results, config)
    results.timings["experiment"] = time.perf_counter() - started
    return results


def _tally(results: Results, key: str, seconds: float) -> None:
    """Add ``seconds`` to the total ``results.timings[key]``."""
    results.timings[key] = results.timings.get(key, 0.0) + seconds


def _reads_merged(variant: Variant) -> bool:
    """Whether ``variant`` is calibrated on the full-precision merge's activations."""
    return variant.kind != "merged" and variant.x_source == "merged"


def _mean(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def _add_row(
    results: Results,
    row: Row,
    accuracy: Callable[[], dict[str, float]],
    announce: Announce,
    seconds: float | None = None,
    *,
    journal: Journal | None = None,
) -> None:
    """Add ``row`` with ``accuracy()`` (or its journalled figures, without calling it)."""
    saved = journal.row(row.name) if journal is not None else None
    if saved is not None:
        results.add(saved)
        announce(f"  {saved.name}: average {100 * average(saved):.1f}  (from the journal)")
        return
    row.accuracy = accuracy()
    results.add(row)
    if journal is not None:
        journal.add_row(row.name, row)
    took = "" if seconds is None else f"  ({seconds:.1f}s)"
    announce(f"  {row.name}: average {100 * average(row):.1f}{took}")


def _restore(results: Results, variant: Variant, journal: Journal, announce: Announce) -> None:
    """Put a variant finished by a stopped run back into ``results`` from the journal."""
    point = journal.point(variant.name)
    if point is not None:
        results.sweeps.setdefault(ALPHA_SWEEP, []).append(point)
        announce(f"  sweep {variant.name}: {100 * point.average:.1f}  (from the journal)")
        return
    row = journal.row(variant.name)
    assert row is not None
    results.add(row)
    announce(f"  {row.name}: average {100 * average(row):.1f}  (from the journal)")


def _evaluate(
    config: ExperimentConfig,
    workload: Workload,
    model: nn.Module,
    heads: dict[str, Any],
    tasks: list[str],
) -> dict[str, float]:
    """Per-task accuracy of ``model``, its forwards in ``config.evaluation.dtype``."""
    from epmq.eval.accuracy import evaluation_precision

    device = resolve_device(config.device)
    assert device is not None
    # the whole model on the device: evaluation holds no activations beyond one batch
    with (
        Onloaded([model], device, write_back=False),
        evaluation_precision(config.evaluation.dtype, device),
    ):
        return workload.evaluate(model, heads, tasks)


def _load(config: ExperimentConfig, workload: Workload, folder: Path) -> nn.Module:
    """The encoder in ``folder``, in eval mode and ``config.model_dtype``."""
    return workload.load_encoder(folder).to(getattr(torch, config.model_dtype)).eval()


def _expert_accuracy(config: ExperimentConfig, workload: Workload) -> dict[str, float]:
    """Each task's expert on its own task."""
    accuracy: dict[str, float] = {}
    for task in workload.tasks:
        expert = _load(config, workload, workload.expert_dirs[task])
        accuracy.update(_evaluate(config, workload, expert, workload.heads, [task]))
        del expert
    return accuracy


def _row(
    variant: Variant, config: ExperimentConfig, seconds: float, chosen: ChosenWeights | None
) -> Row:
    return Row(
        name=variant.name,
        kind=variant.kind,  # type: ignore[arg-type]
        merge=variant.merge,
        quantizer=variant.quantizer if variant.kind == "quantized" else None,  # type: ignore[arg-type]
        bits=variant.bits if variant.kind == "quantized" else None,
        group_size=None if variant.group_size in (None, -1) else variant.group_size,
        x_source=variant.x_source,  # type: ignore[arg-type]
        params=variant.params(config),
        study=variant.study,
        task_weights=None if chosen is None else TaskWeights.model_validate(asdict(chosen)),
        accuracy={},
        seconds=seconds,
    )


def _build_merge(
    merge: MergeSpec,
    base: nn.Module,
    workload: Workload,
    config: ExperimentConfig,
    progress: bool,
    sources: list[ExpertWeights] | None = None,
) -> nn.Module:
    """The full-precision merge of the experts into a copy of the base encoder."""
    from epmq.calib import quantize_model
    from epmq.merging import get_method
    from epmq.merging import merge as merge_state_dicts

    experts = {t: _load(config, workload, d).state_dict() for t, d in workload.expert_dirs.items()}
    # A data-driven merge (RegMean: its registry entry needs per-task Grams) averages the
    # non-linear parameters here; then the calibration engine collects the Grams block by
    # block and solves every linear with the layer-wise solver of the same name.
    data_driven = get_method(merge.method).requires_grams
    method, params = ("average", {}) if data_driven else (merge.method, merge.params)
    state = merge_state_dicts(
        base.state_dict(),
        list(experts.values()),
        method,
        include=merge.include,
        exclude=merge.exclude,
        expert_names=list(experts),
        **params,
    )
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    del experts, state
    if data_driven:
        quantize_model(
            model,
            None,
            workload.calibration,
            method=merge.method,
            experts=sources or _expert_sources(workload),
            **merge.params,
            engine=engine_options(config, progress=progress),
        )
    return model.eval()


def engine_options(config: ExperimentConfig, **options: Any) -> EngineOptions:
    """How the experiment's calibrations run: where (``device``), activations offloaded to
    ``calibration.offload_dir`` or not, plus ``options``."""
    offload = config.calibration.offload_dir
    return EngineOptions(device=config.device, offload_dir=offload, **options)


def _expert_sources(workload: Workload) -> list[ExpertWeights]:
    """One source per task, each tensor read from disk (and checked) once while the shared
    budget (a quarter of the memory) lasts."""
    from epmq.calib import SafetensorsExpert

    budget = CacheBudget()
    return [
        CachedExpert(SafetensorsExpert(workload.expert_dirs[t], name=t), budget)
        for t in workload.tasks
    ]


def _task_weighting(config: ExperimentConfig, workload: Workload) -> TaskWeighting:
    """The experiment's task weights (the config's tasks checked against the workload's)."""
    try:
        check_task_weights(config.quantization.task_weights, workload.tasks)
    except EpmqError as exc:
        raise EpmqError(f"{config.where('quantization.task_weights')}: {exc}") from None
    load = lambda task: _load(config, workload, workload.expert_dirs[task])  # noqa: E731
    rounds, device = config.quantization.task_weight_rounds, resolve_device(config.device)
    return TaskWeighting(workload.calibration, load, rounds=rounds, device=device)


def _weighted_copy(
    merged: nn.Module,
    variant: Variant,
    workload: Workload,
    config: ExperimentConfig,
    progress: bool,
    cache: StatsCache | None,
    sources: list[ExpertWeights],
    weighting: TaskWeighting,
) -> tuple[nn.Module, CalibrationRun, ChosenWeights | None]:
    """:func:`_quantized_copy` with the variant's task weights (none for RTN: no data)."""
    if not get_solver(variant.quantizer or "").uses_inputs:
        return (*_quantized_copy(merged, variant, workload, config, progress, cache, sources), None)

    def build(weights: list[float]) -> nn.Module:
        args = (merged, variant, workload, config, False, cache, sources, weights)
        return _quantized_copy(*args)[0]

    chosen = weighting.choose(variant.weights_setting(config), variant.merge, merged, build)
    args = (merged, variant, workload, config, progress, cache, sources, chosen.values)
    return (*_quantized_copy(*args), chosen)


def _quantized_copy(
    merged: nn.Module,
    variant: Variant,
    workload: Workload,
    config: ExperimentConfig,
    progress: bool,
    cache: StatsCache | None = None,
    sources: list[ExpertWeights] | None = None,
    task_weights: list[float] | None = None,
) -> tuple[nn.Module, CalibrationRun]:
    """A copy of ``merged`` rounded (or retargeted) as ``variant`` says, and its run.

    RTN runs without calibration data (its rounding never reads it; the records then carry no
    proxy loss); ``cache`` serves the merged-stream statistics of ``x_source="merged"``, and
    ``sources`` the experts' tensors (read once per experiment).
    """
    from epmq.calib import quantize_model
    from epmq.quant import QuantGrid

    q = config.quantization
    model = copy.deepcopy(merged)
    grid = None
    if variant.kind == "quantized":
        grid = QuantGrid(
            bits=variant.bits or 4, group_size=variant.group_size or -1, symmetric=q.symmetric
        )
    solver = get_solver(variant.quantizer or "")
    x_source = variant.x_source or solver.default_x_source
    params = variant.params(config)
    reads = solver.needs_experts(params, x_source)
    run = quantize_model(
        model,
        None,
        workload.calibration if solver.uses_inputs else None,
        method=solver,
        grid=grid,
        experts=(sources or _expert_sources(workload)) if reads else None,
        x_source=x_source,
        task_weights=task_weights,
        true_sequential=q.true_sequential,
        **params,
        engine=engine_options(
            config, progress=progress, stats_cache=cache if x_source == "merged" else None
        ),
    )
    return model.eval(), run


def write_outputs(results: Results, out_dir: Path, *, force: bool) -> Path:
    """Write the report (Markdown, JSON, plots) into ``out_dir`` atomically."""
    from epmq.eval.report import write_report

    return write_report(results, out_dir, force=force)
