"""Distributed calibration over ``torch.distributed``: shard the data, share the statistics.

Every rank holds the whole (merged) model and its own shard of every task's calibration
batches. The statistics of a linear are sums over tokens, so the global ones are the sums of
the ranks' (with ``X_i = [X_i^(0) … X_i^(R-1)]``, rank r's tokens ``X_i^(r)``):

    Σ_t x_t x_tᵀ = Σ_r X_i^(r) X_i^(r)ᵀ,    n_i = Σ_r n_i^(r),    H_i = (Σ_r X_i^(r) X_i^(r)ᵀ) / n_i

(and likewise for the expert cross term ``C_i``). Before each solve, :class:`GramReducer`
all-reduces (SUM) the Gram sums, cross sums and token counts, so every rank solves from the
same ``H_i``; rank 0's solution (weight, codes, scales, zeros, g_idx, figures) is then
broadcast, so every rank holds bit-identical weights whatever its solver's floating-point
behaviour. Each rank then propagates its own shard through the solved block. The result
equals a single-process run on the union of the shards up to float summation order.

Without an initialised process group (or with one rank) the reducer does nothing, so the
engine runs unchanged. Every rank must call the engine with the same model, method, settings
and task names (checked once, :meth:`GramReducer.check_same`), and at least one batch per
task; resume checkpoints need one ``checkpoint_dir`` per rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from epmq.calib.solve import LayerSolution
from epmq.calib.statistics import TaskStatistics
from epmq.errors import EpmqError
from epmq.quant import GramAccumulator

logger = logging.getLogger("epmq.calib")

SOURCE_RANK = 0


def group_ready() -> bool:
    """Whether a ``torch.distributed`` default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


class GramReducer:
    """Sums calibration statistics over ranks and shares rank 0's solutions.

    Args:
        enabled: ``None`` (auto): active when a process group is initialised; ``True``:
            require one (:class:`EpmqError` otherwise); ``False``: never active.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        if enabled and not group_ready():
            raise EpmqError(
                "distributed=True needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        grouped = group_ready() if enabled is None else bool(enabled)
        self.rank = dist.get_rank() if grouped else 0
        self.world_size = dist.get_world_size() if grouped else 1
        #: Whether there is anything to share (a process group of more than one rank).
        self.active = self.world_size > 1
        #: Solutions of this rank that differed from rank 0's (and were replaced by them).
        self.mismatches = 0

    def check_same(self, what: str, value: Any) -> None:
        """Raise :class:`EpmqError` unless every rank passes an equal ``value``."""
        if not self.active:
            return
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        for rank, other in enumerate(values):
            if other != values[SOURCE_RANK]:
                raise EpmqError(
                    f"distributed calibration: rank {rank}'s {what} differs from rank "
                    f"{SOURCE_RANK}'s ({other!r} vs {values[SOURCE_RANK]!r})"
                )

    def reduce_(self, stats: TaskStatistics) -> None:
        """Replace every accumulator of ``stats`` by its sum over ranks (in place); folded
        statistics hold only the current task's accumulators, reduced before each fold."""
        if not self.active:
            return
        entries = [(n, t, acc) for n, accs in stats.acc.items() for t, acc in accs.items()]
        if not entries:  # folded statistics after their last task (same on every rank)
            return
        counts = torch.tensor([acc.count for _, _, acc in entries], dtype=torch.int64)
        dist.all_reduce(counts)
        for (name, task, acc), count in zip(entries, counts.tolist(), strict=True):
            state = dict(acc.state_dict())
            for key in ("gram_sum", "cross_sum"):
                if key in state:
                    state[key] = state[key].contiguous()
                    dist.all_reduce(state[key])
            state["count"] = torch.tensor(count)
            stats.acc[name][task] = GramAccumulator.from_state_dict(state)

    def share_(self, solution: LayerSolution, name: str) -> None:
        """Overwrite ``solution`` (of linear ``name``) with rank 0's: the weight, the
        quantization result's codes, scales, zeros and g_idx, and the figures."""
        if not self.active:
            return
        local = solution.weight
        solution.weight = self._broadcast(local.clone())
        result = solution.result
        if result is not None:
            result.weight = solution.weight
            for key in ("codes", "scales", "zeros", "g_idx"):
                setattr(result, key, self._broadcast(getattr(result, key)))
        figures = torch.tensor(
            [solution.proxy_loss, solution.damping, solution.damping_retries], dtype=torch.float64
        )
        self._broadcast(figures)
        solution.proxy_loss, solution.damping = float(figures[0]), float(figures[1])
        solution.damping_retries = int(figures[2])
        if result is not None:
            result.proxy_loss, result.damping = solution.proxy_loss, solution.damping
            result.damping_retries = solution.damping_retries
        if self.rank != SOURCE_RANK and not torch.equal(local, solution.weight):
            self.mismatches += 1
            diff = float((local.float() - solution.weight.float()).abs().max())
            logger.warning(
                "rank %d: solved %s differs from rank %d's by up to %.3g; using rank %d's",
                self.rank, name, SOURCE_RANK, diff, SOURCE_RANK,
            )  # fmt: skip

    @staticmethod
    def _broadcast(tensor: Tensor) -> Tensor:
        """``tensor`` (made contiguous) overwritten by rank 0's."""
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=SOURCE_RANK)
        return tensor
