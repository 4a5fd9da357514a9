"""The memory bound of issue 15 for ``bench_device.py``'s Llama-style model, and what it
leaves out.

Bound: one block × (K + 2) + the block's activations (every task's inputs and outputs, twice
with the expert stream) + the statistics of its largest linear group; on the CPU the model
itself is added by the caller. :func:`working_bytes` is what every run needs beside it,
whatever K: one batch's forward working set and the solver's workspace.
"""

from __future__ import annotations

import argparse
from typing import Any


def statistics_bytes(args: argparse.Namespace, method: str, x_source: str) -> int:
    """The statistics of the block's largest linear group while it is calibrated: the current
    task's Gram accumulator (float64 sums; one for the linears fed the same inputs, as q/k/v;
    with its cross term under the expert stream) and, per linear, the folded float32 sum S
    and, for E-PMQ, B = Σ_i W_i H_i (out × in)."""
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    h, m = args.hidden, args.intermediate
    groups = [  # (in, out) of each linear, Llama's true-sequential groups (one shared input)
        [(h, h), (h, kv), (h, kv)], [(h, h)], [(h, m), (h, m)], [(m, h)],
    ]  # fmt: skip
    sums = 2 if x_source == "expert" else 1
    rows = method == "epmq"

    def group_bytes(group: list[tuple[int, int]]) -> int:
        accumulator = 8 * sums * group[0][0] ** 2
        return accumulator + sum(4 * (i * i + (o * i if rows else 0)) for i, o in group)

    return max(group_bytes(g) for g in groups)


def bound_bytes(args: argparse.Namespace, model: Any, method: str, x_source: str) -> int:
    """The device's share of the issue's bound: one block × (K + 2) + the block's activations
    (every task's inputs and outputs, twice with the expert stream) + the statistics of its
    largest linear group (:func:`statistics_bytes`). On the CPU the model itself is added."""
    import torch

    block = model.model.layers[0]
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    tokens = args.experts * args.seqs * args.tokens
    streams = 2 if x_source == "expert" else 1
    activations = 2 * streams * tokens * args.hidden * element
    stats = statistics_bytes(args, method, x_source)
    return block_bytes * (args.experts + 2) + activations + stats


def working_bytes(args: argparse.Namespace) -> int:
    """What the issue's bound leaves out, whatever K: one batch's forward working set through
    a block (q, k, v, the attention output and the residual, the MLP's gate, up and their
    product in the model dtype; float32 attention scores per head) and the solve's workspace
    for the widest linear (the damped H and its factor in float32, Wᵀ, D = W − Q and Q)."""
    import torch

    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows = args.batch * args.tokens
    forward = rows * (4 * args.hidden + 3 * args.intermediate) * element
    scores = args.batch * args.heads * args.tokens * args.tokens * 4
    shapes = [(args.hidden, args.intermediate), (args.intermediate, args.hidden)]  # (in, out)
    solve = max(4 * (2 * i * i + 3 * i * o) for i, o in shapes)
    return forward + scores + solve
