"""The :class:`LayerProblem` of one linear of a block, as the block holds it when it is solved.

Its merged weight, its statistics (folded sums, or the kept per-task Grams that
:func:`~epmq.calib.solve.solve_layer` folds itself), the targets' weights (each expert's, or the
merged block's snapshot for a solver whose targets come from the merged model) and, for a
solver that fits biases, what bias correction reads: the merged and the targets' biases and
the per-task mean inputs (quant/bias.py).
"""

from __future__ import annotations

from torch import Tensor, nn

from epmq.calib.solve import SolveOptions
from epmq.calib.statistics import FoldedStatistics, TaskStatistics
from epmq.quant.solvers import LayerProblem


def layer_problem(
    block: nn.Module,
    prefix: str,
    name: str,
    stats: TaskStatistics | None,
    states: list[dict[str, Tensor]] | None,
    options: SolveOptions,
    input_scale: Tensor | None = None,
) -> LayerProblem:
    """The problem of ``block``'s linear ``name`` (``prefix``: the block's module name)."""
    module = block.get_submodule(name)
    experts = None if states is None else [s[f"{name}.weight"] for s in states]
    problem = LayerProblem(
        f"{prefix}.{name}", module.weight.detach().float(), None, None, experts,
        input_scale=input_scale,
    )  # fmt: skip
    if isinstance(stats, FoldedStatistics):
        problem.sums = stats.sums(name)
    elif stats is not None:  # solve_layer folds these itself
        problem.grams, problem.crosses = stats.grams(name), stats.crosses(name)
    bias = getattr(module, "bias", None)
    if stats is not None and isinstance(bias, Tensor) and options.solver.fits_bias(options.params):
        problem.merged_bias = bias.detach().float().clone()
        problem.means = stats.means(name)
        problem.target_means = stats.cross_means(name)
        if states is not None:
            problem.expert_biases = [s[f"{name}.bias"] for s in states]
    return problem
