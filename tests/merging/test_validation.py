"""Input validation of the in-memory merge: keys, shapes, dtypes, NaN/Inf, patterns."""

from __future__ import annotations

import pytest
import torch

from epmq.errors import EpmqError
from epmq.merging import merge


def _model(value: float) -> dict[str, torch.Tensor]:
    return {
        "enc.weight": torch.full((2, 3), value),
        "enc.bias": torch.full((2,), value),
        "head.weight": torch.full((4, 2), value),
        "ids": torch.arange(3),
    }


def test_include_exclude_keep_base_values() -> None:
    base, experts = _model(0.0), [_model(1.0), _model(3.0)]
    out = merge(base, experts, "average", include="enc.*", exclude=["*.bias"])
    assert torch.equal(out["enc.weight"], torch.full((2, 3), 2.0))
    assert out["enc.bias"] is base["enc.bias"]
    assert out["head.weight"] is base["head.weight"]
    assert torch.equal(out["ids"], torch.arange(3))


def test_excluded_heads_may_differ_in_shape() -> None:
    base, expert = _model(0.0), _model(1.0)
    expert["head.weight"] = torch.ones(7, 2)
    del expert["enc.bias"]
    out = merge(base, [expert], "task_arithmetic", scale=1.0, exclude=["head.*", "enc.bias"])
    assert torch.equal(out["enc.weight"], torch.ones(2, 3))


def test_inputs_are_not_modified() -> None:
    base, experts = _model(0.0), [_model(1.0), _model(2.0)]
    merge(base, experts, "ties", density=1.0)
    assert torch.equal(experts[0]["enc.weight"], torch.ones(2, 3))
    assert torch.equal(base["enc.weight"], torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.pop("enc.bias"), "expert 1: missing tensor 'enc.bias'"),
        (lambda e: e.update(extra=torch.ones(1)), "expert 1: has tensor 'extra'"),
        (
            lambda e: e.update({"enc.weight": torch.ones(3, 2)}),
            r"expert 1: tensor 'enc.weight' has shape \[3, 2\], base has \[2, 3\]",
        ),
        (
            lambda e: e["enc.bias"].__setitem__(0, float("nan")),
            "expert 1: tensor 'enc.bias' has 1 non-finite values .NaN",
        ),
        (
            lambda e: e["head.weight"].__setitem__(0, float("inf")),
            "expert 1: tensor 'head.weight' has 2 non-finite values .Inf",
        ),
        (
            lambda e: e.update(ids=torch.arange(3, dtype=torch.int32)),
            "expert 1: tensor 'ids' has dtype torch.int32, base has torch.int64",
        ),
    ],
)
def test_bad_expert_is_named(edit, message: str) -> None:
    experts = [_model(1.0), _model(2.0)]
    edit(experts[1])
    with pytest.raises(EpmqError, match=message):
        merge(_model(0.0), experts, "average")


def test_nan_in_base_is_named() -> None:
    base = _model(0.0)
    base["head.weight"][1, 1] = float("nan")
    with pytest.raises(EpmqError, match=r"base: tensor 'head.weight'"):
        merge(base, [_model(1.0)], "average", exclude="head.*")


def test_expert_names_label_errors() -> None:
    expert = _model(1.0)
    del expert["enc.weight"]
    with pytest.raises(EpmqError, match=r"cars: missing tensor 'enc.weight'"):
        merge(_model(0.0), [expert], "average", expert_names=["cars"])


def test_patterns_that_match_nothing_are_errors() -> None:
    with pytest.raises(EpmqError, match=r"include pattern 'vision.*' matches no parameter"):
        merge(_model(0.0), [_model(1.0)], "average", include="vision.*")
    with pytest.raises(EpmqError, match=r"exclude pattern 'clasifier.*'"):
        merge(_model(0.0), [_model(1.0)], "average", exclude="clasifier.*")
    with pytest.raises(EpmqError, match=r"no parameter to merge"):
        merge(_model(0.0), [_model(1.0)], "average", include="enc.*", exclude="enc.*")


def test_no_experts_is_an_error() -> None:
    with pytest.raises(EpmqError, match=r"at least one expert"):
        merge(_model(0.0), [], "average")


def test_mixed_float_dtypes_merge_in_float32_and_keep_base_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=gen)}
    expert = {"w": torch.randn(8, 8, generator=gen).to(torch.bfloat16)}
    out = merge(base, [expert], "task_arithmetic", scale=0.5)
    ref = merge(base, [{"w": expert["w"].float()}], "task_arithmetic", scale=0.5)
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], ref["w"])
    half = merge({"w": base["w"].half()}, [{"w": expert["w"].float()}], "average")
    assert half["w"].dtype == torch.float16
    assert torch.equal(half["w"], expert["w"].half())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_overflowing_the_base_dtype_is_refused(dtype: torch.dtype) -> None:
    """Finite in float32, the merge overflows the base's dtype: the check runs after the cast."""
    big = torch.finfo(dtype).max
    base = {"w": torch.full((2, 2), big / 2, dtype=dtype)}
    experts = [{"w": torch.full((2, 2), big, dtype=dtype)}]
    # base + 1.006 * (big - base) = 1.003 * big: finite in float32, Inf in the base's dtype
    with pytest.raises(EpmqError, match=rf"merge result .* in the base's {dtype}.*'w' has 4 non"):
        merge(base, experts, "task_arithmetic", scale=1.006)
    assert torch.isfinite(merge(base, experts, "task_arithmetic", scale=0.99)["w"]).all()
