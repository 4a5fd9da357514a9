"""RTN: round every weight to the nearest grid point, on its own.

The calibration inputs only feed the reported proxy loss ``tr[(Q − W) H (Q − W)ᵀ]``; without
data the loss is ``nan``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epmq.quant.grid import QuantGrid
from epmq.quant.rtn import rtn
from epmq.quant.solvers.registry import LayerProblem, LayerSolution, register_solver, solution_of


@register_solver("rtn", summary="round to nearest, each weight alone", uses_inputs=False)
def rtn_solver(
    problem: LayerProblem, grid: QuantGrid | None, params: Mapping[str, Any]
) -> LayerSolution:
    assert grid is not None
    hessian = None if problem.sums is None else problem.sums.s
    return solution_of(rtn(problem.merged, grid, hessian=hessian))
