"""E-PMQ: the target (W*, H), its limits, and the objective it minimises."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from epmq.errors import EpmqError
from epmq.quant import GramAccumulator, QuantGrid, epmq, epmq_target, gptq, proxy_loss, rtn


def task_setup(seed: int, k: int = 3, rows: int = 8, cols: int = 24, tokens: int = 96) -> dict:
    """Base weight, K experts (base + task vector), a task-arithmetic merge and task inputs."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    base = torch.randn(rows, cols, generator=g, dtype=d)
    experts = [base + 0.5 * torch.randn(rows, cols, generator=g, dtype=d) for _ in range(k)]
    merged = base + 0.3 * sum(e - base for e in experts)
    xs = []
    for _ in range(k):  # every task has its own input distribution
        mix = torch.randn(cols, cols, generator=g, dtype=d) / cols**0.5
        shift = torch.randn(cols, 1, generator=g, dtype=d)
        xs.append(mix @ torch.randn(cols, tokens, generator=g, dtype=d) + shift)
    grams = [x @ x.T / tokens for x in xs]
    return {"experts": experts, "merged": merged, "xs": xs, "grams": grams}


def objective(q: Tensor, s: dict, alpha: float, task_weights: list[float] | None = None) -> float:
    """sum_i w_i ||Q X_i - W_i X_i||^2 / n_i + lam ||Q - W_m||^2 (design.md section 2)."""
    w = task_weights or [1.0] * len(s["xs"])
    lam = alpha * float(
        torch.diagonal(sum(wi * h for wi, h in zip(w, s["grams"], strict=True))).mean()
    )
    total = lam * float(((q - s["merged"]) ** 2).sum())
    for wi, x, e in zip(w, s["xs"], s["experts"], strict=True):
        total += wi * float(((q @ x - e @ x) ** 2).sum()) / x.shape[1]
    return total


def test_alpha_zero_is_regmean() -> None:
    s = task_setup(0)
    target, h = epmq_target(s["experts"], s["grams"], s["merged"], alpha=0.0)
    gram_sum = sum(s["grams"])
    regmean = torch.linalg.solve(
        gram_sum, sum(e @ g for e, g in zip(s["experts"], s["grams"], strict=True)).T
    ).T
    assert torch.allclose(target, regmean, atol=1e-9)
    assert torch.allclose(h, gram_sum)
    tiny, _ = epmq_target(s["experts"], s["grams"], s["merged"], alpha=1e-9)
    assert torch.allclose(tiny, regmean, atol=1e-6)


def test_task_weights_weigh_experts_and_grams() -> None:
    s = task_setup(1)
    w = [2.0, 0.5, 1.0]
    target, h = epmq_target(s["experts"], s["grams"], s["merged"], alpha=0.0, task_weights=w)
    num = sum(wi * e @ g for wi, e, g in zip(w, s["experts"], s["grams"], strict=True))
    den = sum(wi * g for wi, g in zip(w, s["grams"], strict=True))
    assert torch.allclose(target, torch.linalg.solve(den, num.T).T, atol=1e-9)
    assert torch.allclose(h, den)


def test_target_minimises_the_continuous_objective() -> None:
    s = task_setup(2)
    alpha = 0.3
    target, h = epmq_target(s["experts"], s["grams"], s["merged"], alpha=alpha)
    lam = alpha * float(torch.diagonal(sum(s["grams"])).mean())
    assert torch.allclose(torch.diagonal(h), torch.diagonal(sum(s["grams"])) + lam)
    # objective(Q) = tr[(Q - W*) H (Q - W*)^T] + const for every Q
    g = torch.Generator().manual_seed(9)
    const = objective(target, s, alpha)
    for _ in range(3):
        q = target + torch.randn(target.shape, generator=g, dtype=target.dtype)
        assert objective(q, s, alpha) == pytest.approx(const + proxy_loss(q, target, h), rel=1e-9)


def test_huge_alpha_is_gptq_of_the_merged_weight() -> None:
    """alpha -> inf: W* -> W_m and H -> lam I, so E-PMQ = GPTQ of W_m (= its RTN, H ~ I)."""
    s = task_setup(3)
    grid = QuantGrid(3, 8)
    target, h = epmq_target(s["experts"], s["grams"], s["merged"], alpha=1e8)
    assert torch.allclose(target, s["merged"], atol=1e-6)
    res = epmq(s["experts"], s["grams"], s["merged"], grid, alpha=1e8)
    assert torch.equal(res.codes, gptq(s["merged"], h, grid).codes)
    assert torch.equal(res.codes, rtn(s["merged"], grid).codes)


@pytest.mark.parametrize("alpha", [0.05, 1.0])
def test_merged_targets_ablation_is_damped_gptq(alpha: float) -> None:
    """Experts replaced by W_m: W* = W_m exactly and E-PMQ is GPTQ of W_m with extra damping.

    gptq adds percdamp * mean(diag H) with H = S + alpha m I, so the total damping on S is
    (alpha + percdamp (1 + alpha)) * m.
    """
    s = task_setup(4)
    grid, percdamp = QuantGrid(3), 0.01
    same = [s["merged"]] * 3
    target, _ = epmq_target(same, s["grams"], s["merged"], alpha=alpha)
    assert torch.allclose(target, s["merged"], atol=1e-10)
    res = epmq(same, s["grams"], s["merged"], grid, alpha=alpha, percdamp=percdamp)
    ref = gptq(s["merged"], sum(s["grams"]), grid, percdamp=alpha + percdamp * (1 + alpha))
    assert torch.equal(res.codes, ref.codes)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grid", [QuantGrid(3), QuantGrid(4, 8)])
def test_epmq_beats_gptq_of_merged_on_the_epmq_objective(seed: int, grid: QuantGrid) -> None:
    s = task_setup(10 + seed)
    alpha = 0.1
    res = epmq(s["experts"], s["grams"], s["merged"], grid, alpha=alpha)
    base = gptq(s["merged"], sum(s["grams"]), grid)
    assert objective(res.weight, s, alpha) < objective(base.weight, s, alpha)
    target, h = epmq_target(s["experts"], s["grams"], s["merged"], alpha=alpha)
    assert res.proxy_loss == pytest.approx(proxy_loss(res.weight, target, h), rel=1e-9)
    assert torch.equal(res.weight, res.dequantize())


def test_cross_terms_match_the_expert_activation_objective() -> None:
    """With C_i = X_i^e X_i^T / n, W* zeroes the gradient of
    sum_i ||Q X_i - W_i X_i^e||^2 / n + lam ||Q - W_m||^2 (expert-activation targets)."""
    s = task_setup(5)
    g = torch.Generator().manual_seed(5)
    grams, crosses, xes = [], [], []
    for x in s["xs"]:
        xe = x + 0.2 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        acc = GramAccumulator(x.shape[0], dtype=torch.float64, cross=True)
        acc.add(x.T[:40], xe.T[:40])
        acc.add(x.T[40:], xe.T[40:])
        grams.append(acc.gram)
        crosses.append(acc.cross)
        xes.append(xe)
    alpha = 0.2
    target, _ = epmq_target(s["experts"], grams, s["merged"], alpha=alpha, cross=crosses)
    lam = alpha * float(torch.diagonal(sum(grams)).mean())
    grad = lam * (target - s["merged"])
    for x, xe, e in zip(s["xs"], xes, s["experts"], strict=True):
        grad += (target @ x - e @ xe) @ x.T / x.shape[1]
    assert float(grad.abs().max()) < 1e-9
    same, _ = epmq_target(s["experts"], grams, s["merged"], alpha=alpha, cross=grams)
    plain, _ = epmq_target(s["experts"], grams, s["merged"], alpha=alpha)
    assert torch.allclose(same, plain)


def test_float32_inputs_give_float32_target() -> None:
    s = task_setup(6)
    experts = [e.float() for e in s["experts"]]
    grams = [g.float() for g in s["grams"]]
    target, h = epmq_target(experts, grams, s["merged"].bfloat16(), alpha=0.1)
    assert target.dtype == h.dtype == torch.float32
    ref, _ = epmq_target(s["experts"], s["grams"], s["merged"].bfloat16().double(), alpha=0.1)
    assert torch.allclose(target.double(), ref, atol=1e-4)


def test_bad_inputs_name_the_tensor() -> None:
    s = task_setup(7, k=2)
    e, gr, m = s["experts"], s["grams"], s["merged"]
    with pytest.raises(EpmqError, match="2 expert_weights but 1 grams"):
        epmq_target(e, gr[:1], m, alpha=0.1)
    with pytest.raises(EpmqError, match="task_weights"):
        epmq_target(e, gr, m, alpha=0.1, task_weights=[1.0])
    with pytest.raises(EpmqError, match="task_weights"):
        epmq_target(e, gr, m, alpha=0.1, task_weights=[1.0, -1.0])
    with pytest.raises(EpmqError, match="alpha"):
        epmq_target(e, gr, m, alpha=-1.0)
    with pytest.raises(EpmqError, match="alpha"):
        epmq_target(e, gr, m, alpha=float("inf"))
    with pytest.raises(EpmqError, match="expert_weights is empty"):
        epmq_target([], [], m, alpha=0.1)
    with pytest.raises(EpmqError, match=r"expert_weights\[1\] has shape"):
        epmq_target([e[0], e[1][:, :5]], gr, m, alpha=0.1)
    bad = gr[1].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(EpmqError, match=r"grams\[1\] contains NaN"):
        epmq_target(e, [gr[0], bad], m, alpha=0.1)
    bad_w = e[0].clone()
    bad_w[2, 1] = float("inf")
    with pytest.raises(EpmqError, match=r"expert_weights\[0\] contains Inf"):
        epmq_target([bad_w, e[1]], gr, m, alpha=0.1)
    dead = [g.clone() for g in gr]  # an Inf on an input no task ever uses (Inf * 0 = NaN)
    for g in dead:
        g[1, :] = 0.0
        g[:, 1] = 0.0
    with pytest.raises(EpmqError, match=r"expert_weights\[0\] contains Inf"):
        epmq_target([bad_w, e[1]], dead, m, alpha=0.1)
    bad_c = gr[0].clone()
    bad_c[0, 1] = float("nan")
    with pytest.raises(EpmqError, match=r"cross\[0\] contains NaN"):
        epmq_target(e, gr, m, alpha=0.1, cross=[bad_c, gr[1]])
    huge = [torch.full_like(w, torch.finfo(w.dtype).max) for w in e]
    with pytest.raises(EpmqError, match="overflowed"):
        epmq_target(huge, gr, m, alpha=0.1)
    bad_m = m.clone()
    bad_m[0, 0] = float("inf")
    with pytest.raises(EpmqError, match="merged_weight contains Inf"):
        epmq_target(e, gr, bad_m, alpha=0.1)
    with pytest.raises(EpmqError, match=r"grams\[0\] must have shape"):
        epmq_target(e, [gr[0][:3, :3], gr[1]], m, alpha=0.1)
    with pytest.raises(EpmqError, match="activation energy"):
        epmq_target(e, [torch.zeros_like(g) for g in gr], m, alpha=0.1)


def test_singular_h_at_alpha_zero_recovers_with_a_logged_ridge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # alpha = 0 with only input 0 ever active: S is rank 1, so H needs a ridge. The ridge
    # anchors to W_m, so the dead inputs' columns of W* are W_m's, and the live column is the
    # RegMean solution restricted to it.
    torch.manual_seed(0)
    e = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    m = torch.randn(4, 3, dtype=torch.float64)
    singular = [torch.zeros(3, 3, dtype=torch.float64) for _ in range(2)]
    singular[0][0, 0], singular[1][0, 0] = 1.0, 3.0
    with caplog.at_level("WARNING"):
        w_star, h = epmq_target(e, singular, m, alpha=0.0)
    assert "added ridge" in caplog.text
    assert torch.isfinite(w_star).all()
    assert bool(torch.linalg.cholesky_ex(h).info == 0)
    torch.testing.assert_close(w_star[:, 1:], m[:, 1:])
    regmean_col0 = (e[0][:, 0] * 1.0 + e[1][:, 0] * 3.0) / 4.0
    torch.testing.assert_close(w_star[:, 0], regmean_col0, atol=1e-5, rtol=1e-5)
