"""GPTQ of the merged weight under ``H = Σ_i w_i H_i``.

Calibration is drawn from every task, each task's Gram normalised so every task weighs the
same unless ``w_i`` says otherwise. The settings (:data:`GPTQ_PARAMS`) are shared by every
solver that rounds with GPTQ (E-PMQ); :data:`BIAS_CORRECTION` is shared with E-PMQ too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epmq.params import Param
from epmq.quant.gptq import gptq
from epmq.quant.grid import QuantGrid
from epmq.quant.solvers.norm_correction import NORM_CORRECTION, fits_norms
from epmq.quant.solvers.registry import LayerProblem, LayerSolution, register_solver, solution_of

GPTQ_PARAMS = (
    Param("act_order", bool, False, "process columns by decreasing Hessian diagonal"),
    Param("percdamp", float, 0.01, "damping, a fraction of mean(diag H)", low=0.0),
    Param("block_size", int, 128, "columns per lazy-update block", low=1),
    Param("static_groups", bool, False, "fit every group's scales up front (act-order)"),
)

#: Correct each solved linear's bias toward its targets' outputs (quant/bias.py).
BIAS_CORRECTION = Param(
    "bias_correction", bool, False, "refit each linear's bias to its targets' mean outputs",
    label=lambda v: "bias-corrected" if v else None, slug=lambda v: "bias" if v else None,
)  # fmt: skip


def fits_bias(params: Mapping[str, Any]) -> bool:
    """The ``fits_bias`` declaration of a solver taking :data:`BIAS_CORRECTION`."""
    return bool(params["bias_correction"])


def gptq_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`~epmq.quant.gptq` keyword arguments among a solver's ``params``."""
    return {p.name: params[p.name] for p in GPTQ_PARAMS}


@register_solver(
    "gptq",
    params=(*GPTQ_PARAMS, NORM_CORRECTION, BIAS_CORRECTION),
    summary="GPTQ of the merged weights",
    fits_norms=fits_norms,
    fits_bias=fits_bias,
)
def gptq_solver(
    problem: LayerProblem, grid: QuantGrid | None, params: Mapping[str, Any]
) -> LayerSolution:
    assert grid is not None and problem.sums is not None
    return solution_of(gptq(problem.merged, problem.sums.s, grid, **gptq_settings(params)))
