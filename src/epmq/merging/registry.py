"""The registry of merging methods, by name.

A method is a plain function over the tensors of one parameter::

    @register_method("task_arithmetic", params=[Param("scale", float, 0.3, "...")])
    def task_arithmetic(base, experts, ctx, *, scale):
        return base + scale * (experts - base).sum(0)

``base`` is the base tensor in float32, ``experts`` the K expert tensors stacked into one
float32 tensor of shape ``(K, *base.shape)`` that the method owns (it may overwrite it in
place, which keeps memory at about one tensor per expert), ``ctx`` a :class:`TensorContext`
(the parameter's name, per-task thresholds and Gram matrices when the method asks for them,
seeded random generators), and the keyword arguments are the method's declared parameters,
already validated and filled with defaults. The function returns the merged tensor; the engine
casts it to the base's dtype.

Every method lives in its own module under :mod:`epmq.merging.methods`; adding a method is
adding one file there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from epmq.errors import EpmqError

_KINDS = {float: "float", int: "int", str: "str", list: "list[float]"}


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its type, default, allowed values and help text.

    ``kind`` is ``float``, ``int``, ``str`` or ``list`` (a list of floats, written
    ``1,2,3`` on the command line). ``low``/``high`` bound numbers (inclusive unless
    ``low_open``/``high_open``); ``choices`` restricts strings.
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

    @property
    def type_name(self) -> str:
        return _KINDS[self.kind]

    def parse(self, text: str, method: str) -> Any:
        """Turn command-line text (``"0.2"``, ``"mean"``, ``"1,2,3"``) into a value."""
        text = text.strip()
        try:
            if self.kind is list:
                return [float(part) for part in text.split(",") if part.strip()]
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
class TensorContext:
    """What a method may need besides the tensors: which parameter, and per-task extras.

    ``thresholds``: per-task magnitude thresholds from a global top-k pass (methods whose
    :attr:`MergeMethod.global_density` returns a density). ``grams``: per-task Gram matrices
    of this parameter, when the caller supplied them (``None`` otherwise).
    """

    name: str
    thresholds: tuple[float, ...] | None = None
    grams: Sequence[torch.Tensor] | None = None

    def generator(self, seed: int, task: int) -> torch.Generator:
        """A generator seeded from (seed, parameter name, task): the same draws whatever the
        order in which tensors are processed, in memory or streaming."""
        digest = hashlib.blake2b(f"{seed}:{self.name}:{task}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, parameters and needs."""

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    summary: str
    uses_grams: bool = False
    requires_grams: bool = False
    global_density: Callable[[Mapping[str, Any]], float | None] = field(default=lambda params: None)
    check: Callable[[Mapping[str, Any], int], None] | None = None

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

    def resolve(self, params: Mapping[str, Any], num_experts: int | None = None) -> dict:
        """Fill defaults and validate values; unknown names raise :class:`EpmqError`."""
        for name in params:
            self.param(name)
        resolved = {
            p.name: p.check(params[p.name], self.name) if p.name in params else p.default
            for p in self.params
        }
        if self.check is not None and num_experts is not None:
            self.check(resolved, num_experts)
        return resolved

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
        if self.requires_grams:
            lines.append("  needs per-task Gram matrices (grams=...)")
        return "\n".join(lines)


_REGISTRY: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    summary: str = "",
    uses_grams: bool = False,
    requires_grams: bool = False,
    global_density: Callable[[Mapping[str, Any]], float | None] | None = None,
    check: Callable[[Mapping[str, Any], int], None] | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register ``fn`` under ``name``."""

    def decorate(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            params=tuple(params),
            summary=summary or (fn.__doc__ or "").strip().splitlines()[0],
            uses_grams=uses_grams or requires_grams,
            requires_grams=requires_grams,
            global_density=global_density or (lambda _params: None),
            check=check,
        )
        return fn

    return decorate


def _load_builtin() -> None:
    import epmq.merging.methods  # noqa: F401  (registers the built-in methods)


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; unknown names raise :class:`EpmqError`."""
    _load_builtin()
    if name not in _REGISTRY:
        raise EpmqError(
            f"unknown merge method {name!r}; valid methods: {', '.join(list_methods())}"
        )
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def describe_method(name: str) -> dict[str, Any]:
    """A method's parameters as plain data: ``{name: {type, default, choices, help}}`` under
    ``"params"``, plus ``"summary"`` and ``"requires_grams"``."""
    method = get_method(name)
    return {
        "name": method.name,
        "summary": method.summary,
        "requires_grams": method.requires_grams,
        "params": {
            p.name: {
                "type": p.type_name,
                "default": p.default,
                "choices": list(p.choices),
                "help": p.help,
            }
            for p in method.params
        },
    }
