"""Small random layers for the quantization tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

Layer = tuple[Tensor, Tensor, Tensor]


def random_layer(
    rows: int, cols: int, *, seed: int, tokens: int = 256, dtype: torch.dtype = torch.float64
) -> Layer:
    """Weights [rows, cols], correlated inputs X [cols, tokens] and H = X X^T / tokens."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=dtype)
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) / cols**0.5
    scale = torch.rand(cols, 1, generator=g, dtype=dtype) * 2 + 0.1
    x = scale * (mix @ torch.randn(cols, tokens, generator=g, dtype=dtype))
    return w, x, x @ x.T / tokens


@pytest.fixture
def make_layer() -> Callable[..., Layer]:
    """``make_layer(rows, cols, seed=..., tokens=..., dtype=...) -> (W, X, H)``."""
    return random_layer
