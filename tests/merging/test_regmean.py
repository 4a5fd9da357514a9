"""RegMean against its closed form, and its Gram checks."""

from __future__ import annotations

import logging

import pytest
import torch

from epmq.errors import EpmqError
from epmq.merging import merge


def _setup(k: int = 3, d_out: int = 4, d_in: int = 5, n: int = 20):
    gen = torch.Generator().manual_seed(0)
    base = {"lin.weight": torch.randn(d_out, d_in, generator=gen), "lin.bias": torch.zeros(d_out)}
    experts = [
        {
            "lin.weight": torch.randn(d_out, d_in, generator=gen),
            "lin.bias": torch.randn(d_out, generator=gen),
        }
        for _ in range(k)
    ]
    xs = [torch.randn(n, d_in, generator=gen) for _ in range(k)]
    grams = {"lin.weight": [x.T @ x for x in xs]}
    return base, experts, grams


def test_regmean_matches_closed_form() -> None:
    base, experts, grams = _setup()
    r = 0.9
    out = merge(base, experts, "regmean", grams=grams, reduce_ratio=r)
    reduced = []
    for g in grams["lin.weight"]:
        g = g.double()
        reduced.append(r * g + (1 - r) * torch.diag(torch.diag(g)))
    num = sum(e["lin.weight"].double() @ g for e, g in zip(experts, reduced, strict=True))
    expected = num @ torch.linalg.inv(sum(reduced))
    assert torch.allclose(out["lin.weight"].double(), expected, atol=1e-5)
    mean_bias = torch.stack([e["lin.bias"] for e in experts]).mean(0)
    assert torch.allclose(out["lin.bias"], mean_bias)


def test_regmean_reproduces_each_expert_output_optimum() -> None:
    # with reduce_ratio 1, W minimises sum_i ||X_i W^T - X_i W_i^T||^2: gradient is zero
    base, experts, grams = _setup()
    w = merge(base, experts, "regmean", grams=grams, reduce_ratio=1.0)["lin.weight"].double()
    grad = sum(
        (w - e["lin.weight"].double()) @ g.double()
        for e, g in zip(experts, grams["lin.weight"], strict=True)
    )
    assert float(grad.abs().max()) < 1e-4


def test_regmean_diagonal_and_identity_grams() -> None:
    base, experts, _ = _setup(k=2)
    eye = {"lin.weight": [torch.eye(5), torch.eye(5)]}
    out = merge(base, experts, "regmean", grams=eye)["lin.weight"]
    assert torch.allclose(out, (experts[0]["lin.weight"] + experts[1]["lin.weight"]) / 2)
    d1, d2 = torch.arange(1.0, 6.0), torch.full((5,), 2.0)
    diag = {"lin.weight": [torch.diag(d1), torch.diag(d2)]}
    out = merge(base, experts, "regmean", grams=diag, reduce_ratio=0.0)["lin.weight"]
    expected = (experts[0]["lin.weight"] * d1 + experts[1]["lin.weight"] * d2) / (d1 + d2)
    assert torch.allclose(out, expected, atol=1e-6)


def test_regmean_singular_sum_gets_ridge_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    base, experts, _ = _setup(k=2)
    gram = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0]))  # input 4 is dead everywhere
    with caplog.at_level(logging.WARNING, logger="epmq.merging"):
        out = merge(base, experts, "regmean", grams={"lin.weight": [gram, gram]})["lin.weight"]
    assert "singular" in caplog.text and "lin.weight" in caplog.text
    mean = (experts[0]["lin.weight"] + experts[1]["lin.weight"]) / 2
    assert torch.allclose(out[:, 4], mean[:, 4], atol=1e-5)  # dead column -> the average
    assert torch.allclose(out[:, :4], mean[:, :4], atol=1e-5)  # identical grams -> average


@pytest.mark.parametrize(
    ("grams", "message"),
    [
        (None, "needs per-task Gram"),
        ({"nope.weight": [torch.eye(5)] * 3}, "'nope.weight' is not a parameter"),
        ({"lin.bias": [torch.eye(4)] * 3}, "2-D linear weights"),
        ({"lin.weight": [torch.eye(5)] * 2}, "2 Gram matrices for 3 experts"),
        ({"lin.weight": [torch.eye(4)] * 3}, r"task 0 has shape \[4, 4\], expected \[5, 5\]"),
        ({"lin.weight": [torch.full((5, 5), float("nan"))] * 3}, "grams .task 0.*non-finite"),
    ],
)
def test_regmean_gram_errors(grams: dict | None, message: str) -> None:
    base, experts, _ = _setup()
    with pytest.raises(EpmqError, match=message):
        merge(base, experts, "regmean", grams=grams)


def test_grams_refused_by_methods_without_them() -> None:
    base, experts, grams = _setup()
    with pytest.raises(EpmqError, match="does not use Gram"):
        merge(base, experts, "task_arithmetic", grams=grams)
