"""Method registry: names, parameter descriptions, validation and parsing."""

from __future__ import annotations

import pytest
import torch

from epmq.errors import EpmqError
from epmq.merging import (
    Param,
    TensorContext,
    describe_method,
    get_method,
    list_methods,
    merge,
    register_method,
)


def test_builtin_methods_are_listed() -> None:
    assert {"average", "task_arithmetic", "ties", "dare", "regmean"} <= set(list_methods())


def test_describe_gives_defaults_and_choices() -> None:
    ties = describe_method("ties")["params"]
    assert ties["density"]["default"] == 0.2
    assert ties["scale"]["default"] == 0.3
    assert ties["merge_func"]["choices"] == ["mean", "sum"]
    assert ties["topk_scope"]["default"] == "global"
    assert describe_method("task_arithmetic")["params"]["scale"]["default"] == 0.3
    assert describe_method("regmean")["params"]["reduce_ratio"]["default"] == 0.95
    assert describe_method("regmean")["requires_grams"] is True
    assert "density" in get_method("ties").describe()


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(EpmqError, match=r"unknown merge method 'tie'.*task_arithmetic.*ties"):
        get_method("tie")


def test_unknown_parameter_lists_valid_ones() -> None:
    with pytest.raises(EpmqError, match=r"no parameter 'densty'.*density, merge_func"):
        get_method("ties").resolve({"densty": 0.2})


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 0.0}, r"density' must be in \(0.0, 1.0\]"),
        ("ties", {"density": 1.5}, "density' must be in"),
        ("ties", {"merge_func": "max"}, "must be one of mean, sum"),
        ("ties", {"scale": "big"}, "expects a number"),
        ("ties", {"scale": float("nan")}, "must be finite"),
        ("dare", {"drop_rate": 1.0}, r"must be in \[0.0, 1.0\)"),
        ("dare", {"seed": 1.5}, "expects an integer"),
        ("dare", {"combine": "regmean"}, "must be one of task_arithmetic, ties"),
        ("average", {"weights": "1,2"}, "expects a list"),
    ],
)
def test_bad_values_are_named(method: str, params: dict, message: str) -> None:
    with pytest.raises(EpmqError, match=message):
        get_method(method).resolve(params)


def test_resolve_fills_defaults_and_coerces_ints() -> None:
    resolved = get_method("ties").resolve({"scale": 1})
    assert resolved == {"density": 0.2, "merge_func": "sum", "scale": 1.0, "topk_scope": "global"}
    assert isinstance(resolved["scale"], float)


def test_parse_command_line_assignments() -> None:
    parsed = get_method("ties").parse(["density=0.1", "merge_func=sum", " scale = 1 "])
    assert parsed == {"density": 0.1, "merge_func": "sum", "scale": 1.0}
    assert get_method("average").parse(["weights=1,2.5"]) == {"weights": [1.0, 2.5]}
    assert get_method("dare").parse(["seed=4"]) == {"seed": 4}
    with pytest.raises(EpmqError, match=r"expects float, got 'x'"):
        get_method("ties").parse(["density=x"])
    with pytest.raises(EpmqError, match=r"name=value"):
        get_method("ties").parse(["density"])


def test_new_method_is_one_decorated_function() -> None:
    @register_method(
        "test_only_shift", params=[Param("offset", float, 1.0, "added to the average")]
    )
    def shift(
        base: torch.Tensor, experts: torch.Tensor, ctx: TensorContext, *, offset: float
    ) -> torch.Tensor:
        """Average plus an offset (test only)."""
        return experts.mean(0) + offset

    assert "test_only_shift" in list_methods()
    out = merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], "test_only_shift", offset=2.0)
    assert torch.equal(out["w"], torch.full((2,), 3.0))
