"""Step 3 of the lifecycle: solve one linear layer with the run's solver.

The solvers themselves (RTN, GPTQ, E-PMQ, RegMean, ...) live one per file in
:mod:`epmq.quant.solvers`; this module holds what a run passes them (:class:`SolveOptions`:
the solver, its validated parameters, the grid and the task weights), folds kept per-task
Grams into the sums a solver reads when the statistics were not folded while calibrating, and
corrects the bias of a solved linear when the solver fits biases (quant/bias.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from epmq.errors import EpmqError
from epmq.quant import QuantGrid, TargetSums
from epmq.quant.bias import corrected_bias
from epmq.quant.solvers import LayerProblem, LayerSolution, Solver, get_solver


@dataclass
class SolveOptions:
    """What every layer of a run is solved with: the solver, its parameters (declared by the
    solver, validated and filled with defaults by :meth:`of`), the grid, the task weights."""

    solver: Solver
    params: dict[str, Any] = field(default_factory=dict)
    grid: QuantGrid | None = None
    task_weights: Sequence[float] | None = None

    @classmethod
    def of(
        cls,
        method: str | Solver,
        params: Mapping[str, Any] | None = None,
        grid: QuantGrid | None = None,
        task_weights: Sequence[float] | None = None,
    ) -> SolveOptions:
        """Options for ``method`` (a registered name); :class:`EpmqError` on a bad value."""
        solver = get_solver(method)
        solver.check_grid(grid)
        return cls(solver, solver.resolve(params or {}), grid, task_weights)

    @property
    def method(self) -> str:
        return self.solver.name

    def target_weights(self, experts: Sequence[Tensor] | None, merged: Tensor) -> list | None:
        """What each task's B term is folded with (None: the solver needs S only)."""
        return self.solver.weights_for_target(self.params, experts, merged)


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


def prepare(problem: LayerProblem, options: SolveOptions) -> LayerProblem:
    """Check ``problem`` against the solver's needs and fold kept Grams into sums."""
    solver = options.solver
    problem.merged = problem.merged.float()
    if problem.sums is None and problem.grams is None and solver.uses_inputs:
        raise EpmqError(f"method {solver.name!r} needs calibration statistics for {problem.name!r}")
    if solver.reads_experts and problem.experts is None:
        raise EpmqError(f"method {solver.name!r} needs the experts' weights for {problem.name!r}")
    if problem.sums is None and problem.grams is not None and solver.statistics != "grams":
        weights = options.target_weights(problem.experts, problem.merged)
        crosses = problem.crosses if solver.cross_terms(options.params) else None
        problem.sums = fold_tasks(
            problem.grams, weights, crosses, options.task_weights, problem.merged.device
        )
    return problem


def solve_layer(problem: LayerProblem, options: SolveOptions) -> LayerSolution:
    """Solve ``problem`` with the run's solver (folding kept Grams into sums first); a
    solver that fits biases gets the layer's corrected bias in ``solution.bias``."""
    solution = options.solver.fn(prepare(problem, options), options.grid, options.params)
    if problem.merged_bias is not None and options.solver.fits_bias(options.params):
        solution.bias = fitted_bias(problem, solution.weight, options)
    return solution


def fitted_bias(problem: LayerProblem, weight: Tensor, options: SolveOptions) -> Tensor:
    """The bias of ``problem``'s linear once its weight is ``weight`` (quant/bias.py): toward
    each task's expert (``W_i x̃ + b_i``) for expert targets, else the merged ``W_m x + b_m``."""
    if problem.means is None or problem.merged_bias is None:
        raise EpmqError(f"bias correction of {problem.name!r} needs the mean inputs and bias")
    if options.solver.targets_are_experts(options.params):
        if problem.experts is None or problem.expert_biases is None:
            raise EpmqError(f"bias correction of {problem.name!r} needs the experts' biases")
        targets = list(zip(problem.experts, problem.expert_biases, strict=True))
    else:
        targets = [(problem.merged, problem.merged_bias)] * len(problem.means)
    return corrected_bias(
        weight,
        problem.means,
        targets,
        target_means=problem.target_means,
        task_weights=options.task_weights,
    )


def input_scale(problems: Sequence[LayerProblem], options: SolveOptions) -> Tensor | None:
    """The solver's per-input-channel scale for linears reading one input (None: none)."""
    search = options.solver.input_scales
    if search is None:
        return None
    return search([prepare(p, options) for p in problems], options.grid, options.params)
