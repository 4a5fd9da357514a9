"""GramAccumulator: streaming, merging and serialising per-task input statistics."""

from __future__ import annotations

import pytest
import torch

from epmq.errors import EpmqError
from epmq.quant import GramAccumulator


def tokens(n: int, dim: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_batches_of_any_shape_give_the_gram_of_all_tokens() -> None:
    x = tokens(2 * 5 + 7 + 3)
    acc = GramAccumulator(6, dtype=torch.float64)
    acc.add(x[:10].reshape(2, 5, 6))
    acc.add(x[10:17])
    acc.add(x[17:].reshape(1, 1, 3, 6))
    assert acc.count == 20
    assert torch.allclose(acc.gram, x.T @ x / 20, atol=1e-12)


def test_default_dtype_is_float32_and_half_inputs_are_accepted() -> None:
    acc = GramAccumulator(6)
    x = tokens(32).float()
    acc.add(x.bfloat16())
    assert acc.gram.dtype == torch.float32
    xb = x.bfloat16().float()
    assert torch.allclose(acc.gram, xb.T @ xb / 32, atol=1e-5)


def test_float32_statistics_do_not_depend_on_the_order_of_batches() -> None:
    """Products in float32, sums in float64: one process adding every batch and two "ranks"
    each adding every other batch, then merged, give the same bits (the codes of a
    ``torchrun`` run then equal one process's)."""
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(64, 48, generator=gen) * (1 + i) for i in range(12)]
    one, even, odd = (GramAccumulator(48, cross=True) for _ in range(3))
    for i, x in enumerate(batches):
        one.add(x, x.flip(0))
        (even if i % 2 == 0 else odd).add(x, x.flip(0))
    odd.merge_(even)
    assert one.gram.dtype == torch.float32 and one.state_dict()["gram_sum"].dtype == torch.float64
    assert torch.equal(one.gram, odd.gram) and torch.equal(one.cross, odd.cross)
    # float32 running sums in the two orders differ in their last bits
    sums = [torch.zeros(48, 48), torch.zeros(48, 48), torch.zeros(48, 48)]
    for i, x in enumerate(batches):
        sums[0].addmm_(x.T, x)
        sums[1 + i % 2].addmm_(x.T, x)
    assert not torch.equal(sums[0], sums[1] + sums[2])


def test_merge_sums_statistics() -> None:
    x = tokens(30, seed=1)
    xc = tokens(30, seed=2)
    a, b, whole = (GramAccumulator(6, dtype=torch.float64, cross=True) for _ in range(3))
    a.add(x[:4], xc[:4])
    b.add(x[4:], xc[4:])
    whole.add(x, xc)
    a.merge_(b)
    assert a.count == 30
    assert torch.allclose(a.gram, whole.gram, atol=1e-12)
    assert torch.allclose(a.cross, whole.cross, atol=1e-12)
    assert b.count == 26  # the other side is left untouched


def test_cross_gives_expert_activation_targets() -> None:
    x, xe = tokens(40, seed=3), tokens(40, seed=4)
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    acc = GramAccumulator(6, dtype=torch.float64, cross=True)
    acc.add(x, xe)
    # math convention: X is [dim, n]; here rows are tokens, so X = x.T
    expected = (w @ xe.T) @ x / 40
    assert torch.allclose(w @ acc.cross, expected, atol=1e-12)
    assert GramAccumulator(6).cross is None


def test_state_dict_round_trip() -> None:
    acc = GramAccumulator(6, dtype=torch.float64, cross=True)
    acc.add(tokens(9), tokens(9, seed=1))
    state = acc.state_dict()
    assert set(state) == {"gram_sum", "cross_sum", "count"}
    back = GramAccumulator.from_state_dict(state, dtype=torch.float64)
    assert back.count == 9 and back.dtype == torch.float64
    assert torch.equal(back.gram, acc.gram) and torch.equal(back.cross, acc.cross)
    back.add(tokens(3, seed=2), tokens(3, seed=3))
    assert acc.count == 9  # independent copies


def test_mistakes_are_reported() -> None:
    acc = GramAccumulator(6)
    with pytest.raises(EpmqError, match="no tokens"):
        _ = acc.gram
    with pytest.raises(EpmqError, match="last dim 6"):
        acc.add(torch.ones(3, 5))
    with pytest.raises(EpmqError, match="x_cross given but cross=False"):
        acc.add(torch.ones(3, 6), torch.ones(3, 6))
    bad = torch.ones(3, 6)
    bad[1, 2] = float("nan")
    poisoned = GramAccumulator(6)
    poisoned.add(bad)  # not scanned per batch: the statistics are checked when read
    with pytest.raises(EpmqError, match=r"not finite.*contains NaN"):
        _ = poisoned.gram
    crossed = GramAccumulator(6, cross=True)
    with pytest.raises(EpmqError, match="x_cross is required"):
        crossed.add(torch.ones(3, 6))
    with pytest.raises(EpmqError, match="x_cross has shape"):
        crossed.add(torch.ones(3, 6), torch.ones(2, 6))
    with pytest.raises(EpmqError, match="mismatch"):
        acc.merge_(crossed)
    with pytest.raises(EpmqError, match="dim must be"):
        GramAccumulator(0)
    with pytest.raises(EpmqError, match="missing 'count'"):
        GramAccumulator.from_state_dict({"gram_sum": torch.eye(3)})
    assert acc.count == 0  # failed adds left no trace


def test_inputs_that_require_grad_are_detached() -> None:
    x = tokens(8).float().requires_grad_(True)
    acc = GramAccumulator(6)
    acc.add(x * 2)
    assert not acc.gram.requires_grad


def test_means_are_float64_token_means_and_survive_merge_and_state_dict() -> None:
    x, xc = tokens(12).float(), tokens(12, seed=1).float()
    acc = GramAccumulator(6, cross=True, means=True)
    acc.add(x[:5], xc[:5])
    other = GramAccumulator(6, cross=True, means=True)
    other.add(x[5:], xc[5:])
    acc.merge_(other)
    assert acc.mean is not None and acc.mean.dtype == torch.float64
    assert torch.allclose(acc.mean, x.double().mean(0), atol=1e-12)
    assert acc.cross_mean is not None
    assert torch.allclose(acc.cross_mean, xc.double().mean(0), atol=1e-12)
    again = GramAccumulator.from_state_dict(acc.state_dict())
    assert torch.equal(again.mean, acc.mean) and torch.equal(again.cross_mean, acc.cross_mean)
    plain = GramAccumulator(6)
    plain.add(x)
    assert plain.mean is None and "x_sum" not in plain.state_dict()
    with pytest.raises(EpmqError, match="no means"):
        acc.merge_(
            GramAccumulator.from_state_dict(
                {**plain.state_dict(), "cross_sum": acc.state_dict()["cross_sum"]}
            )
        )
