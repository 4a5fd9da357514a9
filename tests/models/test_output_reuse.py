"""Serving finished sub-modules' outputs across true-sequential passes changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_family_resume_and_grid import FamilySetup, families  # noqa: F401 (fixture)

import epmq.calib.block
from epmq.calib.reuse import FinalOutputs


class NoReuse(FinalOutputs):
    """Records nothing, so every pass recomputes every sub-module."""

    def _candidates(self) -> list[str]:
        return []


@pytest.mark.parametrize("family", ["bert", "clip", "t5", "llama"])
@pytest.mark.parametrize(("method", "x_source"), [("gptq", "quantized"), ("epmq", "expert")])
def test_reuse_is_exact_and_used(
    families: Callable[[str], FamilySetup],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    family: str,
    method: str,
    x_source: str,
) -> None:
    setup = families(family)
    served: list[str] = []
    original = FinalOutputs._server

    def counting(self: FinalOutputs, outputs: dict, last: bool) -> Any:
        inner = original(self, outputs, last)

        def forward(*args: Any, **kwargs: Any) -> Any:
            served.append(family)
            return inner(*args, **kwargs)

        return forward

    monkeypatch.setattr(FinalOutputs, "_server", counting)
    model, run = setup.quantize(method, x_source)
    # T5's attention layers also return the position bias ([batch, heads, T, T], larger than
    # the hidden states), so none is kept, and a lone linear is never kept: nothing to serve
    assert bool(served) == (family != "t5"), served

    monkeypatch.setattr(epmq.calib.block, "FinalOutputs", NoReuse)
    reference, ref_run = setup.quantize(method, x_source)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert run.results.keys() == ref_run.results.keys()
    for name, result in run.results.items():
        assert torch.equal(result.codes, ref_run.results[name].codes), name
    assert [r.proxy_loss for r in run.layers] == [r.proxy_loss for r in ref_run.layers]


def _wrapped(*linears: torch.nn.Linear) -> torch.nn.Sequential:
    """A block of sub-modules holding one linear each ("0.0", "1.0", ...): a lone linear is
    never kept, the sub-module holding it is."""
    return torch.nn.Sequential(*(torch.nn.Sequential(linear) for linear in linears))


def _first_pass(block: torch.nn.Sequential, x: torch.Tensor) -> tuple[FinalOutputs, torch.Tensor]:
    """One recorded pass of task "t", batch 0 through ``block`` with its "0.0" solved."""
    reuse = FinalOutputs(block)
    reuse.mark_solved(["0.0"])
    with reuse.pass_(), reuse.call("t", 0, x):
        out = block(x)
    return reuse, out


def test_outputs_larger_than_the_hidden_states_are_not_kept() -> None:
    block = _wrapped(torch.nn.Linear(4, 16), torch.nn.Linear(16, 4))
    reuse = FinalOutputs(block)
    reuse.mark_solved(["0.0"])
    x = torch.randn(3, 4)
    with reuse.pass_(), reuse.call("t", 0, x):
        block(x)
    assert reuse.served == {}  # "0" outputs 3 x 16 > 3 x 4 elements
    small = _wrapped(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    reuse, first = _first_pass(small, x)
    assert set(reuse.served) == {"0"}
    with torch.no_grad():
        small[0][0].weight.zero_()  # a served module is not run again ...
    with reuse.pass_(), reuse.call("t", 0, x):
        again = small(x)
    assert torch.equal(first, again)  # ... so its recorded output is what comes out


def test_the_last_pass_records_nothing_and_hands_its_copies_over() -> None:
    block = _wrapped(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    x = torch.randn(3, 4)
    reuse, first = _first_pass(block, x)
    kept = reuse.served["0"][("t", 0)]
    reuse.mark_solved(["1.0"])  # "1" would be recorded by another pass
    with reuse.pass_(last=True), reuse.call("t", 0, x):
        middle = block[0](x)
        out = block[1](middle)
    assert middle is kept  # handed over, not copied
    assert torch.equal(out, first)
    assert reuse.served == {}  # nothing kept for a pass that never comes
    with reuse.pass_(), reuse.call("t", 0, x):  # a pass after the last: all recomputed
        block(x)
    assert set(reuse.served) == {"0", "1"}


def test_a_lone_linear_is_never_kept() -> None:
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    reuse = FinalOutputs(block)
    reuse.mark_solved(["0", "1.0"])
    x = torch.randn(3, 4)
    with reuse.pass_(), reuse.call("t", 0, x):
        block(x)
    assert set(reuse.served) == {"1"}  # the container, not the linears "0" and "1.0"
