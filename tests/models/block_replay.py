"""The adapter protocol's capture and propagate steps done by hand, shared by family tests.

Independent of the engine on purpose: a family test checks that its adapter alone reproduces
the model's own forward.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from epmq.models import StopForward


def capture(model: nn.Module, adapter: Any, stage: Any, batch: dict) -> tuple[tuple, dict]:
    """The first block's (args, kwargs) as the model calls it, cleaned by the adapter."""
    got: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, dict(kwargs)))
        raise StopForward

    handle = adapter.blocks(model, stage)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.run_model(model, batch)
    except StopForward:
        pass
    finally:
        handle.remove()
    assert len(got) == 1
    return adapter.prepare_block_inputs(stage, *got[0])


def run_blocks(model: nn.Module, adapter: Any, stage: Any, args: tuple, kwargs: dict) -> Any:
    """Run a stage's blocks one by one from the captured inputs; the final hidden states."""
    for index, block in enumerate(adapter.blocks(model, stage)):
        out = block(*args, **kwargs)
        args, kwargs = adapter.next_block_inputs(stage, index, out, args, kwargs)
    return adapter.hidden_states(args, kwargs)
