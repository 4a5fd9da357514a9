"""Distributed calibration over ``torch.distributed``: shard the data, share the statistics.

Every rank holds the whole (merged) model and its own shard of every task's calibration
batches. The statistics of a linear are sums over tokens, so the global ones are the sums of
the ranks' (with ``X_i = [X_i^(0) … X_i^(R-1)]``, rank r's tokens ``X_i^(r)``):

    Σ_t x_t x_tᵀ = Σ_r X_i^(r) X_i^(r)ᵀ,    n_i = Σ_r n_i^(r),    H_i = (Σ_r X_i^(r) X_i^(r)ᵀ) / n_i

(and likewise for the expert cross term ``C_i``). Before each solve, :class:`GramReducer`
all-reduces (SUM) the Gram sums, cross sums and token counts, so every rank holds the same
``H_i``. The solves are then shared out (weight-parallel, as llm-compressor does): the linears
of a block go to the ranks in turn (:meth:`GramReducer.owner`), each rank solves only its own,
and every solution (weight, codes, scales, zeros, g_idx, figures) is broadcast from the rank
that solved it, so every rank holds bit-identical weights and N ranks share the solve time.
Each rank then propagates its own shard through the solved block. The result equals a
single-process run on the union of the shards up to float summation order.

Without an initialised process group (or with one rank) the reducer does nothing, so the
engine runs unchanged. Every rank must call the engine with the same model, method, settings
and task names (checked once, :meth:`GramReducer.check_same`), and at least one batch per
task; resume checkpoints need one ``checkpoint_dir`` per rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from epmq.calib.statistics import TaskStatistics
from epmq.errors import EpmqError
from epmq.quant import GramAccumulator, QuantGrid, QuantResult
from epmq.quant.solvers import LayerSolution

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
        self._turn = 0  # linears handed out so far (the same sequence on every rank)

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
        accs = stats.distinct_accumulators()
        if not accs:  # folded statistics after their last task (same on every rank)
            return
        counts = torch.tensor([acc.count for acc in accs], dtype=torch.int64)
        dist.all_reduce(counts)
        totals = {id(acc): count for acc, count in zip(accs, counts.tolist(), strict=True)}

        def summed(acc: GramAccumulator) -> GramAccumulator:
            state = dict(acc.state_dict())
            for key in ("gram_sum", "cross_sum", "x_sum", "cross_x_sum"):
                if key in state:
                    state[key] = state[key].contiguous()
                    dist.all_reduce(state[key])
            state["count"] = torch.tensor(totals[id(acc)])
            return GramAccumulator.from_state_dict(state, dtype=acc.dtype)

        stats.replace_accumulators(summed)

    def owner(self, name: str) -> int:
        """The rank that solves the next linear handed out (``name``): the ranks in turn."""
        rank = self._turn % self.world_size
        self._turn += 1
        return rank

    def share_(self, solution: LayerSolution, name: str, src: int = SOURCE_RANK) -> None:
        """Overwrite ``solution`` (of linear ``name``; a :func:`placeholder` on the other
        ranks) with rank ``src``'s: the weight, the quantization result's codes, scales, zeros
        and g_idx, and the figures."""
        if not self.active:
            return
        solution.weight = self._broadcast(solution.weight.float(), src)
        if solution.bias is not None:  # a corrected bias (every rank agrees it has one)
            solution.bias = self._broadcast(solution.bias.double(), src)
        result = solution.result
        if result is not None:
            result.weight = solution.weight
            for key in ("codes", "scales", "zeros", "g_idx"):
                setattr(result, key, self._broadcast(getattr(result, key), src))
        figures = torch.tensor(
            [solution.proxy_loss, solution.damping, solution.damping_retries, solution.seconds],
            dtype=torch.float64,
            device=solution.weight.device,
        )
        self._broadcast(figures, src)
        solution.proxy_loss, solution.damping = float(figures[0]), float(figures[1])
        solution.damping_retries, solution.seconds = int(figures[2]), float(figures[3])
        if result is not None:
            result.proxy_loss, result.damping = solution.proxy_loss, solution.damping
            result.damping_retries, result.seconds = solution.damping_retries, solution.seconds

    @staticmethod
    def _broadcast(tensor: Tensor, src: int) -> Tensor:
        """``tensor`` (made contiguous) overwritten by rank ``src``'s."""
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=src)
        return tensor


def placeholder(
    weight: Tensor, grid: QuantGrid | None, bias: Tensor | None = None
) -> LayerSolution:
    """An empty solution shaped like a linear's (``weight``) on ``grid``: what a rank that
    does not own the linear receives the owner's solution into (:meth:`GramReducer.share_`).
    Solvers return float32 weights and a quantization result exactly when they round; a
    ``bias`` given (the layer's, when the solver corrects it) gets an empty float64 one."""
    rows, cols = weight.shape
    empty = torch.empty(rows, cols, dtype=torch.float32, device=weight.device)
    result = None
    if grid is not None:
        groups = grid.n_groups(cols)
        result = QuantResult(
            weight=empty,
            codes=torch.empty(rows, cols, dtype=grid.codes_dtype(), device=weight.device),
            scales=torch.empty(rows, groups, dtype=torch.float32, device=weight.device),
            zeros=torch.empty(rows, groups, dtype=torch.float32, device=weight.device),
            g_idx=torch.empty(cols, dtype=torch.int32, device=weight.device),
            grid=grid,
            proxy_loss=float("nan"),
            damping=0.0,
            damping_retries=0,
            seconds=0.0,
        )
    solution = LayerSolution(empty, result, float("nan"), 0.0, 0, 0.0)
    if bias is not None:
        solution.bias = torch.empty(rows, dtype=torch.float64, device=weight.device)
    return solution


@contextlib.contextmanager
def launched_group(device: torch.device | None) -> Iterator[tuple[int, int]]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) join the default process
    group for the command's lifetime: NCCL when the blocks run on CUDA (each rank on GPU
    ``LOCAL_RANK``), gloo otherwise. Yields ``(rank, world size)``; ``(0, 1)`` in a plain
    process, or when the caller already initialised a group (it is then used, not closed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or group_ready():
        yield (dist.get_rank(), dist.get_world_size()) if group_ready() else (0, 1)
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a long timeout: under ``epmq run`` rank 0 evaluates each model while the others wait
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    try:
        yield dist.get_rank(), dist.get_world_size()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard(batches: dict[str, list[Any]], rank: int, world_size: int) -> dict[str, list[Any]]:
    """Rank ``rank``'s share of every task's batches (batches r, r + R, ...); every rank
    needs at least one batch of every task."""
    short = [task for task, items in batches.items() if len(items) < world_size]
    if short:
        raise EpmqError(
            f"task {short[0]!r} has {len(batches[short[0]])} calibration batches for "
            f"{world_size} ranks; give each rank at least one (more examples or a smaller batch)"
        )
    return {task: items[rank::world_size] for task, items in batches.items()}
