"""How each model of an experiment's plan is built: the full-precision merge of the experts,
and the quantized (or retargeted) copies of it through the calibration engine, with the
experiment's device, offloading, task weights and the experts' tensors read once
(:class:`epmq.calib.expert_cache.CachedExpert`). :mod:`epmq.experiment.runner` walks the
plan, evaluates and reports.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epmq.calib.engine import CalibrationRun, EngineOptions
from epmq.calib.expert_cache import CacheBudget, CachedExpert
from epmq.calib.expert_weights import ExpertWeights
from epmq.calib.stats_cache import StatsCache
from epmq.calib.task_weights import ChosenWeights, TaskWeighting, check_task_weights
from epmq.devices import resolve_device
from epmq.errors import EpmqError
from epmq.experiment.config import ExperimentConfig, MergeSpec
from epmq.experiment.plan import Variant
from epmq.experiment.workload import Workload
from epmq.quant.solvers import get_solver


def load_model(config: ExperimentConfig, workload: Workload, folder: Path) -> nn.Module:
    """The encoder in ``folder``, in eval mode and ``config.model_dtype``."""
    return workload.load_encoder(folder).to(getattr(torch, config.model_dtype)).eval()


def build_merge(
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

    experts = {
        t: load_model(config, workload, d).state_dict() for t, d in workload.expert_dirs.items()
    }
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
            experts=sources or expert_sources(workload),
            **merge.params,
            engine=engine_options(config, progress=progress),
        )
    return model.eval()


def engine_options(config: ExperimentConfig, **options: Any) -> EngineOptions:
    """How the experiment's calibrations run: where (``device``), activations offloaded to
    ``calibration.offload_dir`` or not, plus ``options``."""
    offload = config.calibration.offload_dir
    return EngineOptions(device=config.device, offload_dir=offload, **options)


def expert_sources(workload: Workload) -> list[ExpertWeights]:
    """One source per task, each tensor read from disk (and checked) once while the shared
    budget (a quarter of the memory) lasts."""
    from epmq.calib import SafetensorsExpert

    budget = CacheBudget()
    return [
        CachedExpert(SafetensorsExpert(workload.expert_dirs[t], name=t), budget)
        for t in workload.tasks
    ]


def task_weighting(config: ExperimentConfig, workload: Workload) -> TaskWeighting:
    """The experiment's task weights (the config's tasks checked against the workload's)."""
    try:
        check_task_weights(config.quantization.task_weights, workload.tasks)
    except EpmqError as exc:
        raise EpmqError(f"{config.where('quantization.task_weights')}: {exc}") from None
    load = lambda task: load_model(config, workload, workload.expert_dirs[task])  # noqa: E731
    rounds, device = config.quantization.task_weight_rounds, resolve_device(config.device)
    return TaskWeighting(workload.calibration, load, rounds=rounds, device=device)


def weighted_copy(
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
        experts=(sources or expert_sources(workload)) if reads else None,
        x_source=x_source,
        task_weights=task_weights,
        true_sequential=q.true_sequential,
        **params,
        engine=engine_options(
            config, progress=progress, stats_cache=cache if x_source == "merged" else None
        ),
    )
    return model.eval(), run
