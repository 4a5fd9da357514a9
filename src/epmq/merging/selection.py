"""Which parameters are merged: shell-style glob patterns on parameter names.

Patterns use :func:`fnmatch.fnmatchcase` against the whole name (``*`` also matches dots):
``vision_model.*`` selects the vision encoder, ``*.bias`` every bias, ``classifier.*`` a head.
A parameter is merged when it matches some ``include`` pattern (all parameters when no include
is given) and no ``exclude`` pattern; every other parameter keeps the base's value. A pattern
that matches no parameter at all is a user mistake and raises :class:`EpmqError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from epmq.errors import EpmqError


def _patterns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class Selection:
    """Include/exclude glob patterns over parameter names."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None
    ) -> Selection:
        return cls(_patterns(include), _patterns(exclude))

    def __call__(self, name: str) -> bool:
        if self.include and not any(fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatchcase(name, p) for p in self.exclude)

    def check(self, names: Iterable[str]) -> list[str]:
        """Selected names, in order; raises when a pattern matches nothing or nothing is left."""
        names = list(names)
        for kind, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatchcase(n, pattern) for n in names):
                    sample = ", ".join(names[:3])
                    raise EpmqError(
                        f"{kind} pattern {pattern!r} matches no parameter "
                        f"(glob on full names, e.g. {sample})"
                    )
        selected = [n for n in names if self(n)]
        if not selected:
            raise EpmqError("include/exclude patterns leave no parameter to merge")
        return selected
