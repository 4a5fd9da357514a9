"""E-PMQ: GPTQ of the expert-guided target under the anchored Hessian.

    H  = Σ_i w_i H_i + λ I,   λ = α · mean(diag Σ_i w_i H_i)
    W* = (Σ_i w_i W_i H_i + λ W_m) H⁻¹        (W_i C_i in place of W_i H_i with X = expert)

Without a grid no rounding happens and ``W*`` itself is written (the continuous target, a merge
in its own right). ``target=merged`` replaces every expert weight by the merged one (the "does
expert guidance matter?" ablation: targets ``W_m X_i``, and then ``W* = W_m``).
``bias_correction`` then refits each linear's bias to the same targets (quant/bias.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from epmq.params import Param
from epmq.quant.gptq import gptq
from epmq.quant.grid import QuantGrid
from epmq.quant.loss import proxy_loss
from epmq.quant.solvers.gptq import BIAS_CORRECTION, GPTQ_PARAMS, fits_bias, gptq_settings
from epmq.quant.solvers.norm_correction import NORM_CORRECTION, fits_norms
from epmq.quant.solvers.registry import LayerProblem, LayerSolution, register_solver, solution_of
from epmq.quant.target import target_from_sums

PARAMS = (
    Param(
        "alpha", float, 0.1, "anchor strength α toward the merged weights", low=0.0,
        label=lambda v: f"α={v:g}", slug=lambda v: f"a{v:g}",
    ),
    Param(
        "target", str, "expert", "whose outputs are the targets", ("expert", "merged"),
        label=lambda v: "merged targets" if v == "merged" else None,
        slug=lambda v: "merged-targets" if v == "merged" else None,
    ),
    *GPTQ_PARAMS,
    NORM_CORRECTION,
    BIAS_CORRECTION,
)  # fmt: skip


@register_solver(
    "epmq",
    label="E-PMQ",
    params=PARAMS,
    summary="E-PMQ: GPTQ of the expert-guided target W* (anchored to the merge)",
    grid="optional",
    statistics="target",
    reads_experts=True,
    # X = expert by default: measured on text8 (README), E-PMQ with each expert's own
    # activations as targets beat X = quantized in all twelve merge x grid settings.
    x_sources=("expert", "quantized", "merged"),
    expert_targets=lambda params: params["target"] == "expert",
    baseline="gptq",
    fits_norms=fits_norms,
    fits_bias=fits_bias,
)
def epmq_solver(
    problem: LayerProblem, grid: QuantGrid | None, params: Mapping[str, Any]
) -> LayerSolution:
    assert problem.sums is not None
    start = time.perf_counter()
    w_star, h = target_from_sums(problem.sums, problem.merged, alpha=params["alpha"])
    if grid is None:  # the continuous target W* as a merge
        loss = proxy_loss(w_star, problem.merged, h)
        return LayerSolution(w_star, None, loss, 0.0, 0, time.perf_counter() - start)
    result = gptq(w_star, h, grid, **gptq_settings(params))
    result.seconds = time.perf_counter() - start  # the target's solve included
    return solution_of(result)
