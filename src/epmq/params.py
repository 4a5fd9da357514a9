"""Declared parameters, shared by merge methods and quantization solvers.

A method (merge or solver) declares each of its parameters once — name, type, default, range,
help — as a :class:`Param`; :class:`Declared` holds the list and does what every registry
needs with it: look a parameter up, fill defaults and validate values from a config or the
Python API, parse ``name=value`` from the command line, and describe the method for
``--list-methods``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epmq.errors import EpmqError

_KINDS = {float: "float", int: "int", str: "str", list: "list[float]", bool: "bool"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its type, default, allowed values and help text.

    ``kind`` is ``float``, ``int``, ``str``, ``bool`` (``true``/``false`` on the command
    line) or ``list`` (a list of floats, written ``1,2,3`` on the command line).
    ``low``/``high`` bound numbers (inclusive unless ``low_open``/``high_open``);
    ``choices`` restricts strings.
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    #: how a value shows in a model's name (``α=0.1``) and folder name (``a0.1``); None (or a
    #: function returning None for the value) leaves it out
    label: Callable[[Any], str | None] | None = None
    slug: Callable[[Any], str | None] | None = None

    @property
    def type_name(self) -> str:
        return _KINDS[self.kind]

    def parse(self, text: str, method: str) -> Any:
        """Turn command-line text (``"0.2"``, ``"mean"``, ``"1,2,3"``) into a value."""
        text = text.strip()
        try:
            if self.kind is list:
                return [float(part) for part in text.split(",") if part.strip()]
            if self.kind is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError(text)
                return text.lower() in _TRUE
            if self.kind is int:
                return int(text)
            if self.kind is float:
                return float(text)
        except ValueError:
            raise EpmqError(
                f"method {method!r}: parameter {self.name!r} expects {self.type_name}, got {text!r}"
            ) from None
        return text

    def check(self, value: Any, method: str) -> Any:
        """Validate (and coerce ints to floats where a float is expected) a value."""
        where = f"method {method!r}: parameter {self.name!r}"
        if value is None and self.default is None:
            return None
        if self.kind is list:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise EpmqError(f"{where} expects a list of numbers, got {value!r}")
            return [self._number(v, where) for v in value]
        if self.kind is bool:
            if not isinstance(value, bool):
                raise EpmqError(f"{where} expects true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise EpmqError(f"{where} expects a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise EpmqError(f"{where} must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise EpmqError(f"{where} expects an integer, got {value!r}")
            number: float = value
        else:
            number = self._number(value, where)
        self._check_range(number, where)
        return number

    @staticmethod
    def _number(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EpmqError(f"{where} expects a number, got {value!r}")
        if not math.isfinite(value):
            raise EpmqError(f"{where} must be finite, got {value!r}")
        return float(value)

    def _check_range(self, number: float, where: str) -> None:
        low_bad = self.low is not None and (
            number <= self.low if self.low_open else number < self.low
        )
        high_bad = self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        )
        if low_bad or high_bad:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            low = "-inf" if self.low is None else self.low
            high = "inf" if self.high is None else self.high
            raise EpmqError(f"{where} must be in {left}{low}, {high}{right}; got {number}")


@dataclass(frozen=True)
class Declared:
    """A registered method's name, summary and declared parameters."""

    name: str
    params: tuple[Param, ...]
    summary: str

    def param(self, name: str) -> Param:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise EpmqError(
            f"method {self.name!r} has no parameter {name!r}; "
            f"valid parameters: {self._param_names()}"
        )

    def _param_names(self) -> str:
        return ", ".join(p.name for p in self.params) or "(none)"

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults and validate values; unknown names raise :class:`EpmqError`."""
        for name in params:
            self.param(name)
        return {
            p.name: p.check(params[p.name], self.name) if p.name in params else p.default
            for p in self.params
        }

    def parse(self, assignments: Sequence[str]) -> dict[str, Any]:
        """Parse ``name=value`` strings (command line) into typed values."""
        values: dict[str, Any] = {}
        for text in assignments:
            name, sep, value = text.partition("=")
            if not sep or not name.strip():
                raise EpmqError(f"--param expects name=value, got {text!r}")
            values[name.strip()] = self.param(name.strip()).parse(value, self.name)
        return values

    def describe(self) -> str:
        """A few lines: name, summary, parameters with types and defaults."""
        lines = [f"{self.name}: {self.summary}"]
        for p in self.params:
            extra = f" (one of {', '.join(p.choices)})" if p.choices else ""
            lines.append(f"  {p.name}: {p.type_name} = {p.default!r}{extra} - {p.help}")
        return "\n".join(lines)

    def labels(self, values: Mapping[str, Any]) -> list[str]:
        """How ``values`` (some of the parameters) show in a model's name, in declared order."""
        shown = (p.label(values[p.name]) for p in self.params if p.label and p.name in values)
        return [text for text in shown if text]

    def slugs(self, values: Mapping[str, Any]) -> list[str]:
        """How ``values`` show in a folder name, in declared order."""
        shown = (p.slug(values[p.name]) for p in self.params if p.slug and p.name in values)
        return [text for text in shown if text]

    def describe_params(self) -> dict[str, dict[str, Any]]:
        """The parameters as plain data: ``{name: {type, default, choices, help}}``."""
        return {
            p.name: {
                "type": p.type_name,
                "default": p.default,
                "choices": list(p.choices),
                "help": p.help,
            }
            for p in self.params
        }
