"""Step 1 of the lifecycle: capture a stage's first-block inputs (the GPTQ "Catcher").

The model runs on each calibration batch with a forward pre-hook on the stage's first block
that records ``(args, kwargs)`` and raises :class:`StopForward`, so only the embeddings (and,
for later stages, the earlier stacks) run. Whatever the block needs — the extended attention
mask, rotary position embeddings, the encoder output — is captured as the model computes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.models.adapter import Batch, BlockAdapter, BlockArgs, BlockKwargs, Stage, StopForward


@dataclass
class BlockCall:
    """One batch's inputs to a block, plus the masks of the tokens that count in statistics.

    ``mask`` is the stage's token mask (:meth:`BlockAdapter.token_mask`); ``linear_masks``
    holds the linears (names relative to the block) whose mask differs from it
    (:meth:`BlockAdapter.linear_token_mask`, e.g. T5's cross-attention ``k``/``v``).
    """

    args: BlockArgs
    kwargs: BlockKwargs
    mask: Tensor | None
    linear_masks: dict[str, Tensor | None] = field(default_factory=dict)

    def mask_for(self, linear: str) -> Tensor | None:
        """The token mask of ``linear``'s inputs."""
        return self.linear_masks.get(linear, self.mask)

    def run(self, block: nn.Module) -> Any:
        """Call ``block`` on these inputs (a :class:`StopForward` from a hook returns None)."""
        try:
            return block(*self.args, **self.kwargs)
        except StopForward:
            return None

    def advanced(self, adapter: BlockAdapter, stage: Stage, index: int, output: Any) -> BlockCall:
        """The call of block ``index + 1`` given block ``index``'s ``output``."""
        args, kwargs = adapter.next_block_inputs(stage, index, output, self.args, self.kwargs)
        return replace(self, args=args, kwargs=kwargs)


#: task name → that task's block calls in batch order: a dict in memory, or their hidden states
#: in files (:class:`epmq.calib.offload.OffloadedStreams`). Read a task's calls with
#: ``streams[task]``; after changing them, assign them back (a no-op in a dict).
Streams = MutableMapping[str, list[BlockCall]]


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside nested tuples/lists/dicts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def detach_tree(value: Any) -> Any:
    """Detach every tensor inside nested tuples/lists/dicts."""
    return map_tensors(value, Tensor.detach)


@torch.no_grad()
def capture_stage_inputs(
    model: nn.Module,
    adapter: BlockAdapter,
    stage: Stage,
    batches: Sequence[Batch],
    task: str,
    device: torch.device | None = None,
) -> list[BlockCall]:
    """Run ``model`` on each batch and record the inputs of ``stage``'s first block.

    With ``device`` each batch is moved there first, so the recorded calls live on it.
    """
    first = adapter.blocks(model, stage)[0]
    captured: list[tuple[BlockArgs, BlockKwargs]] = []

    def catcher(module: nn.Module, args: BlockArgs, kwargs: BlockKwargs) -> None:
        captured.append((detach_tree(args), detach_tree(dict(kwargs))))
        raise StopForward

    calls: list[BlockCall] = []
    handle = first.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for number, batch in enumerate(batches):
            if device is not None:
                batch = map_tensors(dict(batch), lambda t: t.to(device))
            captured.clear()
            with contextlib.suppress(StopForward):
                adapter.run_model(model, batch)
            if not captured:
                raise EpmqError(
                    f"task {task!r}: calibration batch {number} never reached the first "
                    f"{stage.name} block ({stage.blocks_path}.0)"
                )
            args, kwargs = adapter.prepare_block_inputs(stage, *captured[0])
            mask = adapter.token_mask(stage, batch)
            extra = linear_masks(adapter, stage, first, batch, mask)
            calls.append(BlockCall(args, kwargs, mask, extra))
    finally:
        handle.remove()
    return calls


def linear_masks(
    adapter: BlockAdapter, stage: Stage, block: nn.Module, batch: Batch, default: Tensor | None
) -> dict[str, Tensor | None]:
    """The block's linears whose token mask differs from ``default`` (the stage's), with
    their masks (:meth:`BlockAdapter.linear_token_mask`)."""
    names = [name for group in adapter.linear_groups(block) for name in group]
    masks = {name: adapter.linear_token_mask(stage, batch, name) for name in names}
    return {name: mask for name, mask in masks.items() if not _same_mask(mask, default)}


def _same_mask(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)
