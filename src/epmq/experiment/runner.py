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

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epmq.calib.engine import CalibrationRun
from epmq.calib.onload import Onloaded
from epmq.calib.stats_cache import StatsCache
from epmq.calib.task_weights import ChosenWeights
from epmq.devices import resolve_device
from epmq.eval.results import ALPHA_SWEEP, Results, Row, TaskWeights, average
from epmq.experiment.building import (
    build_merge,
    expert_sources,
    load_model,
    task_weighting,
    weighted_copy,
)
from epmq.experiment.config import ExperimentConfig
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

    base = load_model(config, workload, workload.base_dir)
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
    sources = expert_sources(workload)
    weighting = task_weighting(config, workload)
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
                merged = build_merge(merge, base, workload, config, progress, sources)
                cache = StatsCache() if sum(_reads_merged(v) for v in pending) > 1 else None
            clock = time.perf_counter()
            model, run, chosen = (
                (merged, None, None)
                if variant.kind == "merged"
                else weighted_copy(
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


def _expert_accuracy(config: ExperimentConfig, workload: Workload) -> dict[str, float]:
    """Each task's expert on its own task."""
    accuracy: dict[str, float] = {}
    for task in workload.tasks:
        expert = load_model(config, workload, workload.expert_dirs[task])
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


def write_outputs(results: Results, out_dir: Path, *, force: bool) -> Path:
    """Write the report (Markdown, JSON, plots) into ``out_dir`` atomically."""
    from epmq.eval.report import write_report

    return write_report(results, out_dir, force=force)
