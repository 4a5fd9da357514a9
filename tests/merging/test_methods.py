"""Each method on small hand-computable tensors."""

from __future__ import annotations

import pytest
import torch

from epmq.errors import EpmqError
from epmq.merging import merge


def _one(values: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


BASE = _one([1.0, 1.0, 1.0, 1.0])
E1 = _one([2.0, 0.0, 1.5, 1.0])
E2 = _one([4.0, 1.0, 0.5, 3.0])


def test_average_uniform_and_weighted() -> None:
    out = merge(BASE, [E1, E2], "average")["w"]
    assert torch.equal(out, torch.tensor([3.0, 0.5, 1.0, 2.0]))
    out = merge(BASE, [E1, E2], "average", weights=[1.0, 3.0])["w"]
    assert torch.allclose(out, torch.tensor([3.5, 0.75, 0.75, 2.5]))


def test_average_weights_must_match_experts() -> None:
    with pytest.raises(EpmqError, match=r"weights.*3 values for 2 experts"):
        merge(BASE, [E1, E2], "average", weights=[1.0, 1.0, 1.0])


def test_task_arithmetic_default_and_scale() -> None:
    # task vectors: [1,-1,0.5,0] and [3,0,-0.5,2]; sum [4,-1,0,2]
    out = merge(BASE, [E1, E2], "task_arithmetic")["w"]
    assert torch.allclose(out, torch.tensor([2.2, 0.7, 1.0, 1.6]))
    out = merge(BASE, [E1, E2], "task_arithmetic", scale=1.0)["w"]
    assert torch.allclose(out, torch.tensor([5.0, 0.0, 1.0, 3.0]))


def _ties_experts() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = _one([0.0] * 5)
    taus = [
        [2.0, -1.0, 1.0, 1.0, 0.0],
        [-1.0, -1.0, -1.0, -1.0, 0.0],
        [-1.0, 3.0, 0.0, 0.0, 0.0],
    ]
    return base, [_one(t) for t in taus]


def test_ties_sign_election_zero_totals_and_exact_ties() -> None:
    base, experts = _ties_experts()
    kwargs = {"density": 1.0, "scale": 1.0, "topk_scope": "tensor"}
    mean = merge(base, experts, "ties", merge_func="mean", **kwargs)["w"]
    total = merge(base, experts, "ties", merge_func="sum", **kwargs)["w"]
    # entry 0: total 0, one positive vs two negative -> "-" wins: agreeing -1, -1
    # entry 1: total +1 -> "+": only 3 agrees
    # entries 2, 3: total 0 and one positive vs one negative -> exact tie -> 0 (base kept)
    # entry 4: all zero -> 0
    assert torch.equal(mean, torch.tensor([-1.0, 3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(total, torch.tensor([-2.0, 3.0, 0.0, 0.0, 0.0]))


def test_ties_scale_and_defaults() -> None:
    base = _one([1.0, 1.0])
    experts = [_one([3.0, 0.0]), _one([2.0, 0.0])]
    # density 1: tau [2,-1], [1,-1]; default disjoint sum [3, -2] (FusionBench's), scale 0.3
    out = merge(base, experts, "ties", density=1.0)["w"]
    assert torch.allclose(out, torch.tensor([1.9, 0.4]))
    # the TIES paper's disjoint mean [1.5, -1]
    out = merge(base, experts, "ties", density=1.0, merge_func="mean")["w"]
    assert torch.allclose(out, torch.tensor([1.45, 0.7]))


def test_ties_trim_global_versus_tensor_scope() -> None:
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    expert = {"a": torch.tensor([4.0, -3.0, 0.5, 0.1]), "b": torch.tensor([1.0, 2.0, -0.2, 0.3])}
    kwargs = {"density": 0.25, "scale": 1.0}
    glob = merge(base, [expert], "ties", topk_scope="global", **kwargs)
    assert torch.equal(glob["a"], torch.tensor([4.0, -3.0, 0.0, 0.0]))
    assert torch.equal(glob["b"], torch.zeros(4))
    per = merge(base, [expert], "ties", topk_scope="tensor", **kwargs)
    assert torch.equal(per["a"], torch.tensor([4.0, 0.0, 0.0, 0.0]))
    assert torch.equal(per["b"], torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_ties_keeps_all_entries_tied_with_threshold() -> None:
    base = _one([0.0] * 4)
    expert = _one([1.0, -1.0, 1.0, 0.5])
    out = merge(base, [expert], "ties", density=0.25, scale=1.0)["w"]
    assert torch.equal(out, torch.tensor([1.0, -1.0, 1.0, 0.0]))


def test_ties_global_scope_ignores_excluded_parameters() -> None:
    base = {"a": torch.zeros(4), "head": torch.zeros(4)}
    expert = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "head": torch.full((4,), 100.0)}
    out = merge(base, [expert], "ties", density=0.5, scale=1.0, exclude="head")
    assert torch.equal(out["a"], torch.tensor([0.0, 0.0, 3.0, 4.0]))
    assert torch.equal(out["head"], torch.zeros(4))


def test_dare_without_drops_is_task_arithmetic() -> None:
    ta = merge(BASE, [E1, E2], "task_arithmetic", scale=0.5)["w"]
    dare = merge(BASE, [E1, E2], "dare", drop_rate=0.0, scale=0.5)["w"]
    assert torch.allclose(ta, dare)


def test_dare_rescales_survivors_and_drops_about_p() -> None:
    torch.manual_seed(0)
    base = {"w": torch.zeros(20_000)}
    tau = torch.randn(20_000)
    out = merge(base, [{"w": tau}], "dare", drop_rate=0.3, scale=1.0, seed=7)["w"]
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.7)
    dropped = 1 - kept.float().mean().item()
    assert abs(dropped - 0.3) < 4 * (0.3 * 0.7 / 20_000) ** 0.5


def test_dare_seeded_and_order_independent() -> None:
    torch.manual_seed(1)
    base = {"a": torch.zeros(50), "b": torch.zeros(50)}
    expert = {"a": torch.randn(50), "b": torch.randn(50)}
    first = merge(base, [expert], "dare", drop_rate=0.5, seed=3)
    again = merge(
        {"b": base["b"], "a": base["a"]}, [{"b": expert["b"], "a": expert["a"]}], "dare",
        drop_rate=0.5, seed=3,
    )  # fmt: skip
    other = merge(base, [expert], "dare", drop_rate=0.5, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in base)
    assert not torch.equal(first["a"], other["a"])


def test_dare_expected_value_is_task_arithmetic() -> None:
    torch.manual_seed(2)
    base = {"w": torch.randn(30)}
    experts = [{"w": base["w"] + torch.randn(30)} for _ in range(3)]
    p, seeds = 0.5, 400
    runs = torch.stack(
        [merge(base, experts, "dare", drop_rate=p, scale=1.0, seed=s)["w"] for s in range(seeds)]
    )
    ta = merge(base, experts, "task_arithmetic", scale=1.0)["w"]
    taus = torch.stack([e["w"] - base["w"] for e in experts])
    # per entry: Var = sum_i tau_i^2 * p / (1-p); allow 5 standard errors
    stderr = ((taus**2).sum(0) * p / (1 - p) / seeds).sqrt()
    assert bool(((runs.mean(0) - ta).abs() <= 5 * stderr + 1e-6).all())


def test_dare_combined_with_ties() -> None:
    base, experts = _ties_experts()
    ties = merge(base, experts, "ties", density=1.0, topk_scope="tensor", merge_func="sum")
    dare = merge(base, experts, "dare", drop_rate=0.0, combine="ties", merge_func="sum")
    assert torch.allclose(ties["w"], dare["w"])
    assert torch.allclose(dare["w"], 0.3 * torch.tensor([-2.0, 3.0, 0.0, 0.0, 0.0]))
