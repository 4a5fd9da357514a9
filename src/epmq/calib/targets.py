"""Whose outputs a block's linears are fitted to, and the second activation stream.

Solvers with ``target`` statistics fit each task's outputs of a target model: by default each
task's expert (``target_stream="experts"``: the experts' tensors of this block, read when the
block starts), or, for ``target_stream="merge"`` (the fp-target GPTQ baseline), the
full-precision merged model itself: a snapshot of the block taken before any of its linears is
solved (the model is modified in place), used as every task's "expert".

The second stream (the targets' own activations, for the cross terms ``C_i``) runs through
copies of the block holding the targets' tensors: each expert's with ``x_source="expert"``,
the merged snapshot (one copy shared by every task) with ``target_stream="merge"``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from epmq.calib.expert_weights import ExpertWeights
from epmq.quant.solvers import Solver

States = list[dict[str, Tensor]]


def expert_states(
    block: nn.Module, prefix: str, experts: Sequence[ExpertWeights], *, linear_only: bool
) -> States:
    """Each expert's tensors of ``block`` (names relative to the block; ``prefix``: its name)."""
    params = dict(block.named_parameters())
    params.update(dict(block.named_buffers()))
    if linear_only:
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        params = {n: p for n, p in params.items() if n.rsplit(".", 1)[0] in linears}
    return [
        {n: expert.tensor(f"{prefix}.{n}", like=p.detach()) for n, p in params.items()}
        for expert in experts
    ]


def expert_blocks(block: nn.Module, states: Sequence[dict[str, Tensor]]) -> list[nn.Module]:
    """Copies of ``block`` (taken before it is modified) holding each expert's tensors.

    A copy's parameters and buffers *are* the state's tensors (shared, never written: the
    copies only run forwards), so the experts' tensors of a block are held once, not twice;
    tensors a state lacks are copied from ``block``.
    """
    tensors = dict(block.named_parameters())
    tensors.update(dict(block.named_buffers()))
    blocks = []
    for state in states:
        memo: dict[int, Any] = {}
        for name, value in tensors.items():
            if name in state:
                shared = state[name]
                if isinstance(value, nn.Parameter):
                    shared = nn.Parameter(shared, requires_grad=value.requires_grad)
                memo[id(value)] = shared
        blocks.append(copy.deepcopy(block, memo))
    return blocks


def block_targets(
    block: nn.Module,
    prefix: str,
    experts: Sequence[ExpertWeights] | None,
    tasks: Sequence[str],
    solver: Solver,
    *,
    stream: bool,
) -> tuple[States | None, list[nn.Module] | None]:
    """The targets' tensors of ``block``, one dict per task (None: the solver reads none),
    and, with ``stream``, the blocks that run the second stream (module docs)."""
    if solver.target_stream == "merge":
        if not stream:
            return None, None
        twin = copy.deepcopy(block)  # before the block is solved: the full-precision merge
        state = {n: p.detach() for n, p in twin.named_parameters()}
        return [state] * len(tasks), [twin] * len(tasks)
    states = None
    if solver.reads_experts or stream:
        assert experts is not None
        states = expert_states(block, prefix, experts, linear_only=not stream)
    twins = expert_blocks(block, states) if stream and states is not None else None
    return states, twins
