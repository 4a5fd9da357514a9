"""The built-in solvers: importing this module registers each (one module per solver)."""

from epmq.quant.solvers import awq, epmq, gptq, regmean, rtn  # noqa: F401
