"""RegMean, the data-driven merge, solved layer by layer (no rounding).

``W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹`` with the off-diagonals of every per-task Gram ``G_i``
scaled by ``reduce_ratio``; with the expert activation stream the Grams are those of each
expert's own inputs. The merge registry's ``regmean`` (``epmq merge --method regmean``) solves
with the same function from Grams it is given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from epmq.merging.methods.regmean import PARAMS, solve_regmean
from epmq.quant.grid import QuantGrid
from epmq.quant.solvers.registry import LayerProblem, LayerSolution, register_solver


@register_solver(
    "regmean",
    label="RegMean",
    params=PARAMS,
    summary="RegMean merge of every linear from per-task Grams (no rounding)",
    grid="none",
    statistics="grams",
    reads_experts=True,
    gram_inputs="expert",
)
def regmean_solver(
    problem: LayerProblem, grid: QuantGrid | None, params: Mapping[str, Any]
) -> LayerSolution:
    assert problem.experts is not None and problem.grams is not None
    start = time.perf_counter()
    stacked = torch.stack([w.float() for w in problem.experts])
    weight = solve_regmean(stacked, list(problem.grams), params["reduce_ratio"], problem.name)
    return LayerSolution(weight, None, float("nan"), 0.0, 0, time.perf_counter() - start)
