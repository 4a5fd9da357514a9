"""Step 4 of the lifecycle: propagate — run a solved block on every task's calls to produce
the next block's inputs (serving the finished sub-modules' outputs kept by
:class:`~epmq.calib.reuse.FinalOutputs`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from epmq.calib.capture import BlockCall
from epmq.calib.reuse import FinalOutputs
from epmq.models.adapter import BlockAdapter, Stage

Streams = dict[str, list[BlockCall]]


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
    """Run ``block`` on each call; return the next block's calls."""
    out = []
    for b, call in enumerate(calls):
        with served(reuse, adapter, task, b, call):
            out.append(call.advanced(adapter, stage, index, call.run(block)))
    return out


def propagate(
    adapter: BlockAdapter,
    stage: Stage,
    index: int,
    block: nn.Module,
    calls: Streams,
    *,
    reuse: FinalOutputs | None = None,
) -> Streams:
    """:func:`propagate_calls` for every task (serving ``reuse``'s final outputs)."""
    with reuse.pass_() if reuse is not None else contextlib.nullcontext():
        return {
            task: propagate_calls(adapter, stage, index, block, task_calls, task=task, reuse=reuse)
            for task, task_calls in calls.items()
        }
