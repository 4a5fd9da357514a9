"""Tests that run several solvers with one set of settings keep what each solver declares
(``quantize_model`` refuses a parameter its solver does not have)."""

from __future__ import annotations

from typing import Any

from epmq.quant.solvers import get_solver


def params_for(method: str, **settings: Any) -> dict[str, Any]:
    """The subset of ``settings`` that ``method`` declares as parameters."""
    declared = {p.name for p in get_solver(method).params}
    return {name: value for name, value in settings.items() if name in declared}
