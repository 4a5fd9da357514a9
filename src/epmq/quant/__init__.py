"""epmq.quant: the quantization core.

Grids and results (:class:`QuantGrid`, :class:`QuantResult`), the solvers :func:`rtn`,
:func:`gptq` and :func:`epmq` (expert-guided GPTQ on the target of :func:`epmq_target`),
the proxy loss, and :class:`GramAccumulator` for per-task input statistics.
"""

from epmq.quant.gptq import gptq
from epmq.quant.gram import GramAccumulator
from epmq.quant.grid import QuantGrid
from epmq.quant.loss import proxy_loss
from epmq.quant.result import QuantResult
from epmq.quant.rtn import rtn
from epmq.quant.target import TargetSums, epmq, epmq_target, target_from_sums

__all__ = [
    "GramAccumulator",
    "QuantGrid",
    "QuantResult",
    "TargetSums",
    "epmq",
    "epmq_target",
    "gptq",
    "proxy_loss",
    "rtn",
    "target_from_sums",
]
