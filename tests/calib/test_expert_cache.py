"""CachedExpert serves the source's tensors, reading each from the source once."""

import pytest
import torch

from epmq.calib import EngineOptions, StateDictExpert, quantize_model
from epmq.calib.expert_cache import CacheBudget, CachedExpert
from epmq.errors import EpmqError
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid


class CountingExpert(StateDictExpert):
    def __init__(self, state, name: str) -> None:
        super().__init__(state, name)
        self.reads = 0

    def _read(self, key: str) -> torch.Tensor:
        self.reads += 1
        return super()._read(key)


def test_each_tensor_is_read_once() -> None:
    source = CountingExpert({"a.weight": torch.ones(2, 3), "bert.b.weight": torch.zeros(4)}, "x")
    cached = CachedExpert(source)
    like = torch.empty(2, 3, dtype=torch.float64)
    first = cached.tensor("a.weight", like)
    assert cached.tensor("a.weight", like) is first and first.dtype == torch.float64
    assert torch.equal(cached.tensor("b.weight"), torch.zeros(4))  # names resolve as the source's
    assert source.reads == 2
    assert cached.nbytes == 2 * 3 * 8 + 4 * 4
    with pytest.raises(EpmqError, match="shape"):
        cached.tensor("a.weight", torch.empty(3, 2))


def test_runs_with_cached_experts_equal_runs_with_the_sources(setup) -> None:
    sources = [CountingExpert(state, f"e{i}") for i, state in enumerate(setup.experts)]
    cached = [CachedExpert(s) for s in sources]
    weights, reads = [], []
    for experts in (sources, cached, cached):
        model = setup.merged()
        quantize_model(
            model,
            BertAdapter(),
            setup.calib,
            method="epmq",
            grid=QuantGrid(3),
            experts=experts,
            engine=EngineOptions(progress=False),
        )
        weights.append(model.state_dict())
        reads.append(sum(s.reads for s in sources))
    assert reads[1] == 2 * reads[0] and reads[2] == reads[1]  # the second cached run read none
    for state in weights[1:]:
        for name, value in weights[0].items():
            assert torch.equal(value, state[name]), name


def test_a_spent_budget_serves_from_the_source_without_keeping() -> None:
    state = {"a.weight": torch.ones(2, 3), "b.weight": torch.full((4,), 2.0)}
    budget = CacheBudget(max_bytes=2 * 3 * 4 + 8)  # a.weight fits, b.weight does not
    first, second = CountingExpert(state, "x"), CountingExpert(state, "y")
    cached = [CachedExpert(first, budget), CachedExpert(second, budget)]
    assert cached[0].tensor("a.weight") is cached[0].tensor("a.weight")
    assert first.reads == 1 and budget.used == 24
    for _ in range(2):
        assert torch.equal(cached[1].tensor("b.weight"), torch.full((4,), 2.0))
    assert second.reads == 2 and budget.refused == 2  # read each time, never held
    assert cached[1].nbytes == 0 and budget.used == 24
