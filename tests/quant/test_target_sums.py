"""TargetSums / target_from_sums: the streaming form of epmq_target's sums."""

from __future__ import annotations

import pytest
import torch

from epmq.errors import EpmqError
from epmq.quant import TargetSums, epmq_target, target_from_sums


def _problem(k: int = 3, rows: int = 5, cols: int = 7) -> tuple[list, list, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, cols, generator=gen) for _ in range(k)]
    grams = []
    for _ in range(k):
        x = torch.randn(cols, 40, generator=gen)
        grams.append(x @ x.T / 40)
    return weights, grams, torch.stack(weights).mean(0)


def test_sums_fold_to_the_closed_form_target() -> None:
    weights, grams, w_m = _problem()
    sums = TargetSums(5, 7, dtype=torch.float64)
    for w, h, tw in zip(weights, grams, [1.0, 2.0, 0.5], strict=True):
        sums.add(h, w, task_weight=tw)
    target, h = target_from_sums(sums, w_m, alpha=0.2)
    s = sum(tw * g.double() for g, tw in zip(grams, [1.0, 2.0, 0.5], strict=True))
    lam = 0.2 * float(torch.diagonal(s).mean())
    triples = zip(weights, grams, [1.0, 2.0, 0.5], strict=True)
    b = sum(tw * w.double() @ g.double() for w, g, tw in triples)
    expected = (b + lam * w_m.double()) @ torch.linalg.inv(s + lam * torch.eye(7))
    torch.testing.assert_close(target, expected)
    ref, _ = epmq_target(weights, grams, w_m, alpha=0.2, task_weights=[1.0, 2.0, 0.5])
    torch.testing.assert_close(target.float(), ref, rtol=1e-4, atol=1e-5)


def test_sums_without_b_cannot_give_a_target() -> None:
    _, grams, w_m = _problem()
    sums = TargetSums(0, 7)
    sums.add(grams[0])
    assert sums.b is None and sums.tasks == 1
    with pytest.raises(EpmqError, match="without B"):
        target_from_sums(sums, w_m, alpha=0.1)
    with pytest.raises(EpmqError, match="expert weight is needed"):
        TargetSums(5, 7).add(grams[0])


def test_non_finite_folded_statistics_are_an_error() -> None:
    weights, grams, w_m = _problem()
    sums = TargetSums(5, 7)
    bad = grams[1].clone()
    bad[2, 3] = float("nan")
    sums.add(grams[0], weights[0])
    sums.add(bad, weights[1])
    with pytest.raises(EpmqError, match="NaN/Inf"):
        target_from_sums(sums, w_m, alpha=0.1)
