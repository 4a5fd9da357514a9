"""Built-in suites: a pretrained base, tasks with fixed splits, and cached experts.

from epmq.suites import get_suite, list_suites
suite = get_suite("text8")            # or "tiny" for tests
models = suite.prepare()              # trains once, then loads from the cache
encoder = suite.load_encoder(models.expert_dirs["rt_sentiment"])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from epmq.errors import EpmqError
from epmq.suites.suite import Suite, SuiteModels
from epmq.suites.task import Split, Task

__all__ = ["Split", "Suite", "SuiteModels", "Task", "get_suite", "list_suites"]


def _text8(cache_dir: str | Path | None, quick: bool, **overrides: Any) -> Suite:
    from epmq.suites.text8.suite import text8_suite

    return text8_suite(cache_dir, quick, **overrides)


def _tiny(cache_dir: str | Path | None, quick: bool, **overrides: Any) -> Suite:
    from epmq.suites.tiny import tiny_suite

    return tiny_suite(cache_dir, quick, **overrides)


_SUITES: dict[str, Callable[..., Suite]] = {"text8": _text8, "tiny": _tiny}


def list_suites() -> list[str]:
    """Names accepted by :func:`get_suite`."""
    return sorted(_SUITES)


def get_suite(
    name: str, cache_dir: str | Path | None = None, quick: bool = False, **overrides: Any
) -> Suite:
    """The suite called ``name``.

    ``cache_dir`` replaces the cache root (default ``$EPMQ_CACHE/suites`` or
    ``~/.cache/epmq/suites``); ``quick`` uses fewer examples and steps for a fast first look;
    ``overrides`` change individual settings (``steps=100``, ``seed=1``, ...), each of which
    is part of the cache key.
    """
    if name not in _SUITES:
        raise EpmqError(f"unknown suite {name!r}; suites are {list_suites()}")
    return _SUITES[name](cache_dir, quick, **overrides)
