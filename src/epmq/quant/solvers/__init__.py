"""Quantization solvers: one file per solver, registered by name (:mod:`.registry`)."""

from epmq.quant.solvers.registry import (
    LayerProblem,
    LayerSolution,
    Solver,
    get_solver,
    list_solvers,
    register_solver,
    solution_of,
    solver_label,
    solver_rank,
)

__all__ = [
    "LayerProblem",
    "LayerSolution",
    "Solver",
    "get_solver",
    "list_solvers",
    "register_solver",
    "solution_of",
    "solver_label",
    "solver_rank",
]
