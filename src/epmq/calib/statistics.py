"""Step 2 of the lifecycle: per-task input statistics of a block's linears.

:class:`LinearInputs` puts forward pre-hooks on named linears and keeps the latest input of
each (flattened to ``[tokens, in]``, padding dropped by the linear's token mask: the stage's
mask, or the one the adapter names for that linear, e.g. the encoder mask for T5's
cross-attention keys and values). With
``stop=True`` it raises :class:`StopForward` as soon as every watched linear has been called,
so a true-sequential pass only runs the block up to the group being solved.

:class:`TaskStatistics` holds one ``GramAccumulator`` per linear per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from epmq.models.adapter import StopForward
from epmq.quant import GramAccumulator


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
    """Per-linear, per-task Gram accumulators (``cross=True`` for the expert X-source)."""

    def __init__(
        self, block: nn.Module, names: Sequence[str], tasks: Sequence[str], *, cross: bool
    ) -> None:
        self.tasks = list(tasks)
        self.cross = cross
        self.acc: dict[str, dict[str, GramAccumulator]] = {}
        for name in names:
            dim = block.get_submodule(name).in_features
            self.acc[name] = {t: GramAccumulator(dim, cross=cross) for t in self.tasks}

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
            first = self.acc[names[0]][task]
            if len(names) == 1:
                first.add(x, xc)
                continue
            batch = GramAccumulator(first.dim, dtype=first.dtype, cross=self.cross)
            batch.add(x, xc)
            for name in names:
                self.acc[name][task].merge_(batch)

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
