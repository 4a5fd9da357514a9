"""Tiny experts for the engine-level family tests: the base with its blocks perturbed."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_experts(
    base: nn.Module, block_marker: str, k: int = 2, scale: float = 0.1
) -> list[dict[str, torch.Tensor]]:
    """``k`` state dicts: ``base``'s, with float tensors whose name holds ``block_marker``
    (e.g. ``".layers."``) perturbed by ``scale`` × their std (seeded)."""
    gen = torch.Generator().manual_seed(7)
    experts = []
    for _ in range(k):
        state = {}
        for name, value in base.state_dict().items():
            value = value.clone()
            if block_marker in name and value.is_floating_point():
                value += scale * value.std() * torch.randn(value.shape, generator=gen)
            state[name] = value
        experts.append(state)
    return experts


def with_state(base: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``base`` holding ``state``, in eval mode."""
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model.eval()
