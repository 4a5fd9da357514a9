"""Markdown pieces shared by the report's sections: numbers, bit settings, tables, labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def pts(points: float) -> str:
    return f"{points:+.1f}"


def bits_label(bits: int, group: int | None) -> str:
    return f"{bits}-bit" + ("" if group is None else f" g{group}")


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def param_labels(quantizer: str | None, params: dict[str, Any]) -> list[str]:
    """The labels a solver's declaration gives ``params`` (an unknown solver's: k=v)."""
    from epmq.quant.solvers import list_solvers

    if quantizer in list_solvers():
        from epmq.quant.solvers import get_solver

        known = get_solver(quantizer)
        declared = {p.name for p in known.params}
        if set(params) <= declared:
            return known.labels(params)
    return [f"{k}={v}" for k, v in params.items()]
