"""The built-in solvers: importing this module registers each (one module per solver), in
the order reports list them when a results file does not say (baselines first)."""

from epmq.quant.solvers import rtn  # noqa: I001,F401  (the order matters)
from epmq.quant.solvers import awq  # noqa: F401
from epmq.quant.solvers import gptq  # noqa: F401
from epmq.quant.solvers import gptq_fp  # noqa: F401
from epmq.quant.solvers import epmq  # noqa: F401
from epmq.quant.solvers import regmean  # noqa: F401
