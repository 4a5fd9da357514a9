"""GPTQ with full-precision targets: the merged model's own outputs, fitted from the quantized
stream (asymmetric calibration, as GPTAQ and llm-compressor's ``propagate_error=False``).

    min_Q  Σ_i w_i ‖Q X_i^q − W_m X_i^fp‖² / n_i  +  λ ‖Q − W_m‖²

``X^q``: the layer's inputs through the model as quantized so far; ``X^fp``: through the
full-precision merged model (the engine runs that second stream: ``target_stream="merge"``,
the merged block snapshot standing in for every task's expert). With
``S = Σ_i w_i H_i``, ``H_i = X_i^q X_i^qᵀ / n_i``, ``C_i = X_i^fp X_i^qᵀ / n_i`` and GPTQ's own
damping ``λ = percdamp · mean(diag S)`` (no α anchor)::

    H  = S + λ I
    W* = (W_m Σ_i w_i C_i + λ W_m) H⁻¹       (λ → 0: W_m (Σ_i w_i C_i) S⁻¹)

then GPTQ rounds ``W*`` under ``S`` with the same damping, i.e. under ``H``. This is E-PMQ's
cross-term machinery with ``W_m`` in place of every expert; where nothing is quantized yet
(``X^fp = X^q``, the first block) ``C_i = H_i`` and ``W* = W_m``: plain GPTQ. The damping
enters the target as GPTQ's does its objective (``λ ‖Q − W_m‖²``), so the reduction is exact.
``bias_correction`` refits each bias to the merged model's mean outputs ``W_m μ_i^fp + b_m``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from epmq.quant.gptq import gptq
from epmq.quant.grid import QuantGrid
from epmq.quant.solvers.gptq import BIAS_CORRECTION, GPTQ_PARAMS, fits_bias, gptq_settings
from epmq.quant.solvers.registry import LayerProblem, LayerSolution, register_solver, solution_of
from epmq.quant.target import target_from_sums


@register_solver(
    "gptq-fp",
    label="GPTQ (fp targets)",
    params=(*GPTQ_PARAMS, BIAS_CORRECTION),
    summary="GPTQ fitting the full-precision merged model's outputs from the quantized stream",
    statistics="target",
    x_sources=("quantized",),
    target_stream="merge",
    fits_bias=fits_bias,
)
def gptq_fp_solver(
    problem: LayerProblem, grid: QuantGrid | None, params: Mapping[str, Any]
) -> LayerSolution:
    assert grid is not None and problem.sums is not None
    start = time.perf_counter()
    s = problem.sums.s.clone()  # target_from_sums turns S into H in place
    w_star, _ = target_from_sums(problem.sums, problem.merged, alpha=params["percdamp"])
    result = gptq(w_star, s, grid, **gptq_settings(params))
    result.seconds = time.perf_counter() - start  # the target's solve included
    return solution_of(result)
