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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from epmq.errors import EpmqError
from epmq.params import Declared, Param

__all__ = ["MergeMethod", "Param", "TensorContext", "get_method", "register_method"]


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
class MergeMethod(Declared):
    """A registered method: its function, parameters and needs."""

    fn: MethodFn
    uses_grams: bool = False
    requires_grams: bool = False
    global_density: Callable[[Mapping[str, Any]], float | None] = field(default=lambda params: None)
    check: Callable[[Mapping[str, Any], int], None] | None = None

    def resolve(self, params: Mapping[str, Any], num_experts: int | None = None) -> dict:
        """Fill defaults and validate values; unknown names raise :class:`EpmqError`."""
        resolved = super().resolve(params)
        if self.check is not None and num_experts is not None:
            self.check(resolved, num_experts)
        return resolved

    def describe(self) -> str:
        """A few lines: name, summary, parameters with types and defaults."""
        text = super().describe()
        if self.requires_grams:
            text += "\n  needs per-task Gram matrices (grams=...)"
        return text


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
        "params": method.describe_params(),
    }
