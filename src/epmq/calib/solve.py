"""Step 3 of the lifecycle: solve one linear layer from its per-task statistics.

Methods (``LayerProblem`` carries everything a solve needs):

- ``rtn``: round to nearest (the Hessian only feeds the reported proxy loss; without Grams
  the loss is ``nan``).
- ``gptq``: GPTQ of the merged weight under ``H = Σ_i w_i H_i`` (calibration drawn from every
  task, each task's Gram normalised so every task weighs the same unless ``w_i`` says otherwise).
- ``epmq``: GPTQ of the expert-guided target ``W*`` under ``H = Σ_i w_i H_i + λI``
  (``epmq.quant.epmq``); with ``grid=None`` no rounding, ``W*`` itself is written (the
  continuous target as a merge). ``target="merged"`` replaces every expert weight by the merged
  weight (the "does expert guidance matter?" ablation; then ``W* = W_m``).
- ``regmean``: the RegMean merge ``W = (Σ W_i G_i)(Σ G_i)⁻¹`` with the off-diagonals of every
  ``G_i`` scaled by ``regmean_scale`` (no rounding).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from epmq.errors import EpmqError
from epmq.merging.methods.regmean import REDUCE_RATIO, solve_regmean
from epmq.quant import (
    QuantGrid,
    QuantResult,
    TargetSums,
    gptq,
    proxy_loss,
    rtn,
    target_from_sums,
)

METHODS = ("rtn", "gptq", "epmq", "regmean")
NEEDS_EXPERTS = ("epmq", "regmean")


@dataclass
class SolveOptions:
    """Solver settings shared by every layer of a run."""

    method: str
    grid: QuantGrid | None
    alpha: float = 0.1
    target: str = "expert"
    task_weights: Sequence[float] | None = None
    act_order: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    static_groups: bool = False
    regmean_scale: float = REDUCE_RATIO

    def validate(self) -> None:
        """Raise :class:`EpmqError` on an inconsistent combination."""
        if self.method not in METHODS:
            raise EpmqError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.target not in ("expert", "merged"):
            raise EpmqError(f"target must be 'expert' or 'merged', got {self.target!r}")
        if self.grid is None and self.method in ("rtn", "gptq"):
            raise EpmqError(f"method {self.method!r} needs a quantization grid")
        if not 0.0 <= self.regmean_scale <= 1.0:
            raise EpmqError(f"regmean_scale must be in [0, 1], got {self.regmean_scale!r}")
        if self.alpha < 0 or not torch.isfinite(torch.tensor(float(self.alpha))):
            raise EpmqError(f"alpha must be a finite number >= 0, got {self.alpha}")


@dataclass
class LayerProblem:
    """One linear layer: merged weight, per-task Grams (and crosses), experts' weights.

    ``grams`` and ``sums`` are None for RTN without calibration data; RegMean needs ``grams``.
    """

    name: str
    merged: Tensor
    grams: list[Tensor] | None
    crosses: list[Tensor] | None
    experts: list[Tensor] | None
    #: ``S`` and ``B`` folded from the statistics (calib/statistics.py); when None they are
    #: folded here from ``grams`` (and ``crosses``).
    sums: TargetSums | None = None


@dataclass
class LayerSolution:
    """The weight to write back, the quantization result (None for merges), the figures."""

    weight: Tensor
    result: QuantResult | None
    proxy_loss: float
    damping: float
    damping_retries: int
    seconds: float


def fold_tasks(
    grams: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    crosses: Sequence[Tensor] | None,
    task_weights: Sequence[float] | None,
    device: torch.device | None = None,
) -> TargetSums:
    """Fold finished per-task statistics, in task order, into :class:`TargetSums` (on
    ``device``; default: the first Gram's)."""
    rows = 0 if weights is None else int(weights[0].shape[0])
    device = grams[0].device if device is None else device
    sums = TargetSums(rows, int(grams[0].shape[0]), dtype=grams[0].dtype, device=device)
    for i, gram in enumerate(grams):
        weight = None if weights is None else weights[i]
        cross = None if crosses is None or weights is None else crosses[i]
        w = 1.0 if task_weights is None else float(task_weights[i])
        sums.add(gram, weight, cross=cross, task_weight=w)
    return sums


def fold_weights(
    options: SolveOptions, experts: Sequence[Tensor] | None, merged: Tensor
) -> list[Tensor] | None:
    """The weights each task's B term is folded with: the experts' (E-PMQ), W_m repeated
    (E-PMQ with merged targets), or None (GPTQ and RTN need S only)."""
    if options.method != "epmq":
        return None
    if experts is None:
        raise EpmqError("method 'epmq' needs the experts' weights")
    return [merged] * len(experts) if options.target == "merged" else list(experts)


def solve_layer(problem: LayerProblem, options: SolveOptions) -> LayerSolution:
    """Solve ``problem`` with ``options.method``."""
    w_m = problem.merged.float()
    method = options.method
    if problem.grams is None and problem.sums is None:
        if method != "rtn":
            raise EpmqError(f"method {method!r} needs calibration statistics for {problem.name!r}")
        assert options.grid is not None
        return _from_result(rtn(w_m, options.grid))
    if method in NEEDS_EXPERTS and problem.experts is None:
        raise EpmqError(f"method {method!r} needs the experts' weights for {problem.name!r}")
    if method == "regmean":
        return _regmean(problem, options.regmean_scale)
    sums = problem.sums
    if sums is None:
        assert problem.grams is not None
        weights = fold_weights(options, problem.experts, w_m)
        crosses = problem.crosses if options.target == "expert" else None
        sums = fold_tasks(problem.grams, weights, crosses, options.task_weights, w_m.device)
    if method in ("rtn", "gptq"):
        assert options.grid is not None
        if method == "rtn":
            result = rtn(w_m, options.grid, hessian=sums.s)
        else:
            result = gptq(w_m, sums.s, options.grid, **_gptq_kwargs(options))
        return _from_result(result)
    start = time.perf_counter()
    w_star, h = target_from_sums(sums, w_m, alpha=options.alpha)
    if options.grid is None:  # the continuous target W* as a merge
        loss = proxy_loss(w_star, w_m, h)
        return LayerSolution(w_star, None, loss, 0.0, 0, time.perf_counter() - start)
    result = gptq(w_star, h, options.grid, **_gptq_kwargs(options))
    result.seconds = time.perf_counter() - start  # the target's solve included
    return _from_result(result)


def _gptq_kwargs(options: SolveOptions) -> dict[str, object]:
    return {
        "block_size": options.block_size,
        "percdamp": options.percdamp,
        "act_order": options.act_order,
        "static_groups": options.static_groups,
    }


def _from_result(result: QuantResult) -> LayerSolution:
    return LayerSolution(
        result.weight,
        result,
        float(result.proxy_loss),
        float(result.damping),
        int(result.damping_retries),
        float(result.seconds),
    )


def _regmean(problem: LayerProblem, scale: float) -> LayerSolution:
    """RegMean merge of one layer (the solver of :mod:`epmq.merging.methods.regmean`)."""
    assert problem.experts is not None
    start = time.perf_counter()
    weight = regmean_layer(problem.experts, problem.grams, scale, problem.name)
    return LayerSolution(weight, None, float("nan"), 0.0, 0, time.perf_counter() - start)


def regmean_layer(
    experts: Sequence[Tensor], grams: Sequence[Tensor], scale: float, name: str = ""
) -> Tensor:
    """``W = (Σ W_i G̃_i)(Σ G̃_i)⁻¹``, off-diagonals of each ``G_i`` scaled by ``scale``."""
    stacked = torch.stack([w.float() for w in experts])
    return solve_regmean(stacked, list(grams), scale, name)
