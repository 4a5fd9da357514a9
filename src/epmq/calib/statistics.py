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
        self._handles: list[Any] = []

    def reset(
        self, mask: Tensor | None, linear_masks: Mapping[str, Tensor | None] | None = None
    ) -> None:
        """Forget recorded inputs; use ``mask`` for the next call, ``linear_masks[name]``
        instead for the linears it names."""
        self.inputs = {}
        self.mask = mask
        self.linear_masks = linear_masks or {}

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            mask = self.linear_masks.get(name, self.mask)
            self.inputs[name] = flatten_tokens(args[0].detach(), mask)
            if self.stop and len(self.inputs) == len(self.names):
                raise StopForward

        return hook

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
        """Accumulate one batch's recorded inputs (and the expert stream's, for ``cross``)."""
        for name, accs in self.acc.items():
            x = inputs[name].float()
            if self.cross:
                if cross_inputs is None:
                    raise RuntimeError("cross statistics need the expert stream's inputs")
                accs[task].add(x, cross_inputs[name].float())
            else:
                accs[task].add(x)

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
