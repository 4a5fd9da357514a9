"""Step 2 of the lifecycle: per-task input statistics of a block's linears.

:class:`LinearInputs` puts forward pre-hooks on named linears and keeps the latest input of
each (flattened to ``[tokens, in]``, padding dropped by the linear's token mask: the stage's
mask, or the one the adapter names for that linear, e.g. the encoder mask for T5's
cross-attention keys and values). With
``stop=True`` it raises :class:`StopForward` as soon as every watched linear has been called,
so a true-sequential pass only runs the block up to the group being solved.

:class:`TaskStatistics` holds one ``GramAccumulator`` per linear per task until the solve;
:class:`FoldedStatistics` folds each task's statistics into the two sums the solvers need
(``S = Σ_i w_i H_i`` and, for E-PMQ, ``B = Σ_i w_i W_i H_i``) as soon as the task's batches are
done, so the memory per linear does not grow with the number of tasks (quant/target.py).
With ``means=True`` both also keep each task's mean inputs ``μ_i`` (and the expert stream's
``μ̃_i`` with ``cross``), float64 vectors taken in the same pass (bias correction).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from epmq.devices import module_device
from epmq.errors import EpmqError
from epmq.models.adapter import StopForward
from epmq.quant import GramAccumulator, TargetSums


def flatten_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """``[..., in]`` activations as ``[tokens, in]`` rows, keeping masked-in tokens.

    ``mask`` filters ``x`` when its shape is ``x``'s leading shape; otherwise (or with no
    mask) every token counts.
    """
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


class LinearInputs:
    """Context manager recording the inputs of ``names`` (submodules of ``block``)."""

    def __init__(self, block: nn.Module, names: Sequence[str], *, stop: bool) -> None:
        self.block = block
        self.names = list(names)
        self.stop = stop
        self.mask: Tensor | None = None
        self.linear_masks: Mapping[str, Tensor | None] = {}
        self.inputs: dict[str, Tensor] = {}
        # (module input, mask, flattened rows) of this call: linears fed the same tensor under
        # the same mask (q/k/v, gate/up) share one flattened tensor, so their Gram is computed
        # once (TaskStatistics.add groups inputs by identity).
        self._flat: list[tuple[Tensor, Tensor | None, Tensor]] = []
        self._handles: list[Any] = []

    def reset(
        self, mask: Tensor | None, linear_masks: Mapping[str, Tensor | None] | None = None
    ) -> None:
        """Forget recorded inputs; use ``mask`` for the next call, ``linear_masks[name]``
        instead for the linears it names."""
        self.inputs = {}
        self._flat = []
        self.mask = mask
        self.linear_masks = linear_masks or {}

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            mask = self.linear_masks.get(name, self.mask)
            self.inputs[name] = self._flatten(args[0], mask)
            if self.stop and len(self.inputs) == len(self.names):
                raise StopForward

        return hook

    def _flatten(self, x: Tensor, mask: Tensor | None) -> Tensor:
        for source, source_mask, flat in self._flat:
            if source is x and source_mask is mask:
                return flat
        flat = flatten_tokens(x.detach(), mask)
        self._flat.append((x, mask, flat))
        return flat

    def __enter__(self) -> LinearInputs:
        for name in self.names:
            module = self.block.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class TaskStatistics:
    """Per-linear, per-task Gram accumulators (``cross=True`` for the expert X-source;
    ``means=True`` also keeps the mean inputs)."""

    def __init__(
        self,
        block: nn.Module,
        names: Sequence[str],
        tasks: Sequence[str],
        *,
        cross: bool,
        means: bool = False,
    ) -> None:
        self.tasks = list(tasks)
        self.cross = cross
        self.keep_means = means
        self.device = module_device(block)  # statistics live where the block runs
        self.dims = {name: int(block.get_submodule(name).in_features) for name in names}
        self.acc: dict[str, dict[str, GramAccumulator]] = {name: {} for name in names}
        for name in names:
            for task in self._tasks_made_up_front():
                self._accumulator(name, task)

    def _tasks_made_up_front(self) -> list[str]:
        """Tasks whose accumulators exist before any batch (all: every rank reduces the same
        set, and a task without batches fails with a clear error at the solve)."""
        return self.tasks

    def _accumulator(self, name: str, task: str) -> GramAccumulator:
        accs = self.acc[name]
        if task not in accs:
            accs[task] = GramAccumulator(
                self.dims[name], cross=self.cross, device=self.device, means=self.keep_means
            )
        return accs[task]

    def add(
        self, task: str, inputs: dict[str, Tensor], cross_inputs: dict[str, Tensor] | None
    ) -> None:
        """Accumulate one batch's recorded inputs (and the expert stream's, for ``cross``).

        Linears whose recorded inputs are the same tensor (see :class:`LinearInputs`) get the
        product computed once and added to each of their accumulators.
        """
        if self.cross and cross_inputs is None:
            raise RuntimeError("cross statistics need the expert stream's inputs")
        groups: dict[tuple[int, int], list[str]] = {}
        for name in self.acc:
            other = id(cross_inputs[name]) if self.cross and cross_inputs is not None else 0
            groups.setdefault((id(inputs[name]), other), []).append(name)
        for names in groups.values():
            x = inputs[names[0]].float()
            xc = None if cross_inputs is None or not self.cross else cross_inputs[names[0]].float()
            self._shared_accumulator(names, task).add(x, xc)

    def _shared_accumulator(self, names: list[str], task: str) -> GramAccumulator:
        """The one accumulator of linears fed the same inputs (q/k/v, gate/up): made shared
        on the task's first batch, so the product is taken, kept and all-reduced once."""
        accs = [self._accumulator(name, task) for name in names]
        if all(acc is accs[0] for acc in accs):
            return accs[0]
        if any(acc.count for acc in accs):
            raise RuntimeError(f"linears {names} were fed different inputs on an earlier batch")
        for name in names:
            self.acc[name][task] = accs[0]
        return accs[0]

    def distinct_accumulators(self) -> list[GramAccumulator]:
        """Every accumulator once (shared ones are listed once), in the same order on every
        rank."""
        found: dict[int, GramAccumulator] = {}
        for accs in self.acc.values():
            for acc in accs.values():
                found.setdefault(id(acc), acc)
        return list(found.values())

    def replace_accumulators(self, change: Callable[[GramAccumulator], GramAccumulator]) -> None:
        """Put ``change(acc)`` in place of every accumulator, once per shared one (sharing
        kept)."""
        done: dict[int, GramAccumulator] = {}
        for accs in self.acc.values():
            for task, acc in accs.items():
                if id(acc) not in done:
                    done[id(acc)] = change(acc)
                accs[task] = done[id(acc)]

    def grams(self, name: str) -> list[Tensor]:
        """Per-task normalised Grams ``X_i X_iᵀ / n_i`` of linear ``name``."""
        return [self.acc[name][t].gram for t in self.tasks]

    def crosses(self, name: str) -> list[Tensor] | None:
        """Per-task cross terms ``X_i^expert X_iᵀ / n_i`` (None without ``cross``)."""
        if not self.cross:
            return None
        return [self.acc[name][t].cross for t in self.tasks]

    def counts(self, name: str) -> dict[str, int]:
        """Tokens seen per task for linear ``name``."""
        return {t: int(self.acc[name][t].count) for t in self.tasks}

    def means(self, name: str) -> list[Tensor] | None:
        """Per-task mean inputs ``μ_i`` of linear ``name`` (None: not kept)."""
        found = [self.acc[name][t].mean for t in self.tasks]
        return None if any(m is None for m in found) else found  # type: ignore[return-value]

    def cross_means(self, name: str) -> list[Tensor] | None:
        """Per-task mean expert-stream inputs ``μ̃_i`` (None: not kept, or no ``cross``)."""
        found = [self.acc[name][t].cross_mean for t in self.tasks]
        return None if any(m is None for m in found) else found  # type: ignore[return-value]

    def end_task(self, task: str) -> None:
        """All of ``task``'s batches were added (nothing to do: Grams are kept until the solve)."""


class FoldedStatistics(TaskStatistics):
    """Like :class:`TaskStatistics`, but each task is folded into per-linear sums as soon as
    :meth:`end_task` is called, and its accumulators are dropped.

    Args:
        fold: per linear, the weight each task folds B with (its expert's, or W_m repeated
            for merged targets), or None to keep S only (GPTQ, RTN).
        task_weights: w_i, default 1 each.
        reduce: called with this object before each fold (sums the current task's
            accumulators over distributed ranks); None in a single process.
    """

    def __init__(
        self,
        block: nn.Module,
        names: Sequence[str],
        tasks: Sequence[str],
        *,
        cross: bool,
        fold: Mapping[str, Sequence[Tensor] | None],
        task_weights: Sequence[float] | None = None,
        reduce: Callable[[TaskStatistics], None] | None = None,
        means: bool = False,
    ) -> None:
        super().__init__(block, names, tasks, cross=cross, means=means)
        self.fold = fold
        self.task_weights = task_weights
        self.reduce = reduce
        self.folded: dict[str, TargetSums] = {}
        self._counts: dict[str, dict[str, int]] = {name: {} for name in self.acc}
        self._means: dict[str, dict[str, tuple[Tensor | None, Tensor | None]]] = {
            name: {} for name in self.acc
        }
        for name, dim in self.dims.items():
            rows = 0 if fold[name] is None else int(block.get_submodule(name).out_features)
            self.folded[name] = TargetSums(rows, dim, device=self.device)

    def _tasks_made_up_front(self) -> list[str]:
        return []  # only the task being recorded has accumulators (made on its first batch)

    def end_task(self, task: str) -> None:
        """Fold ``task``'s statistics into every linear's sums; drop its accumulators."""
        if self.reduce is not None:
            self.reduce(self)
        t = self.tasks.index(task)
        w = 1.0 if self.task_weights is None else float(self.task_weights[t])
        for name, accs in self.acc.items():
            acc = accs.pop(task)
            weights = self.fold[name]
            weight = None if weights is None else weights[t]
            cross = acc.cross if weights is not None else None
            self.folded[name].add(acc.gram, weight, cross=cross, task_weight=w)
            self._counts[name][task] = int(acc.count)
            self._means[name][task] = (acc.mean, acc.cross_mean)

    def counts(self, name: str) -> dict[str, int]:
        """Tokens seen per task for linear ``name``."""
        return dict(self._counts[name])

    def means(self, name: str) -> list[Tensor] | None:
        found = [self._means[name][t][0] for t in self.tasks if t in self._means[name]]
        ok = len(found) == len(self.tasks) and all(m is not None for m in found)
        return found if ok else None  # type: ignore[return-value]

    def cross_means(self, name: str) -> list[Tensor] | None:
        found = [self._means[name][t][1] for t in self.tasks if t in self._means[name]]
        ok = len(found) == len(self.tasks) and all(m is not None for m in found)
        return found if ok else None  # type: ignore[return-value]

    def grams(self, name: str) -> list[Tensor]:
        raise EpmqError("folded statistics keep no per-task Grams (use TaskStatistics)")

    def crosses(self, name: str) -> list[Tensor] | None:
        raise EpmqError("folded statistics keep no per-task cross terms (use TaskStatistics)")

    def sums(self, name: str) -> TargetSums:
        """The folded sums of linear ``name`` (every task must have ended)."""
        sums = self.folded[name]
        if sums.tasks != len(self.tasks):
            raise EpmqError(
                f"statistics of {name!r}: {sums.tasks} of {len(self.tasks)} tasks were folded"
            )
        return sums
