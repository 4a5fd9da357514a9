"""Exact global top-k thresholds by radix selection."""

from __future__ import annotations

import math

import pytest
import torch

from epmq.merging.topk import global_thresholds, keep_count, tensor_threshold


def _reference(tensors: list[torch.Tensor], density: float) -> float:
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    k = keep_count(density, flat.numel())
    return math.inf if k == 0 else float(torch.kthvalue(flat, flat.numel() - k + 1).values)


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.93, 1.0])
def test_global_threshold_equals_kthvalue_over_all_tensors(density: float) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (37, 11), "b": (101,), "c": (3, 4, 5)}
    tasks = [
        {n: torch.randn(s, generator=gen) * (10.0**i) for n, s in shapes.items()} for i in range(3)
    ]
    tasks[2]["b"][:50] = 0.25  # many ties
    tasks[1]["a"][:] = 0.0
    found = global_thresholds(list(shapes), lambda n: [t[n] for t in tasks], 3, density)
    for i, task in enumerate(tasks):
        assert found[i] == _reference(list(task.values()), density)


def test_nothing_kept_gives_infinite_threshold() -> None:
    found = global_thresholds(["a"], lambda n: [torch.ones(10)], 1, 0.01)
    assert found == (math.inf,)
    assert tensor_threshold(torch.ones(10), 0.01) == math.inf


def test_tensor_threshold() -> None:
    assert tensor_threshold(torch.tensor([-5.0, 1.0, 3.0, -2.0]), 0.5) == 3.0
