"""Step 4 of the lifecycle: propagate — run a solved block on every task's calls to produce
the next block's inputs (serving the finished sub-modules' outputs kept by
:class:`~epmq.calib.reuse.FinalOutputs`).

Each call is replaced by its successor in its list as soon as it is computed, so a block's
inputs are freed as its outputs are made: the activations held while propagating stay at one
copy plus one batch, not inputs and outputs side by side.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from epmq.calib.capture import BlockCall, Streams
from epmq.calib.reuse import FinalOutputs
from epmq.models.adapter import BlockAdapter, Stage


def served(
    reuse: FinalOutputs | None, adapter: BlockAdapter, task: str, index: int, call: BlockCall
) -> contextlib.AbstractContextManager[None]:
    """``reuse.call`` for one block call (a no-op without reuse)."""
    if reuse is None:
        return contextlib.nullcontext()
    return reuse.call(task, index, adapter.hidden_states(call.args, call.kwargs))


@torch.no_grad()
def propagate_calls(
    adapter: BlockAdapter,
    stage: Stage,
    index: int,
    block: nn.Module,
    calls: list[BlockCall],
    *,
    task: str = "",
    reuse: FinalOutputs | None = None,
) -> list[BlockCall]:
    """Run ``block`` on each call, replacing it in ``calls`` by the next block's call (the
    list is returned)."""
    for b, call in enumerate(calls):
        with served(reuse, adapter, task, b, call):
            output = call.run(block)
        calls[b] = call.advanced(adapter, stage, index, output)
        del call, output  # the inputs go now, not when the next call is made
    return calls


def propagate(
    adapter: BlockAdapter,
    stage: Stage,
    index: int,
    block: nn.Module,
    calls: Streams,
    *,
    reuse: FinalOutputs | None = None,
) -> Streams:
    """:func:`propagate_calls` for every task, one task at a time, in place (serving
    ``reuse``'s final outputs: the block's last pass); ``calls`` is returned."""
    with reuse.pass_(last=True) if reuse is not None else contextlib.nullcontext():
        for task in list(calls):
            task_calls = calls[task]
            calls[task] = propagate_calls(
                adapter, stage, index, block, task_calls, task=task, reuse=reuse
            )
            del task_calls
    return calls
