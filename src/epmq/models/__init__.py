"""Model families: adapters that tell the calibration engine how to walk a model's blocks.

See :mod:`epmq.models.adapter` for the protocol. Family modules (``bert``, ``clip``, ``t5``,
``llama``) register their adapters on import; :func:`adapter_for` imports those present and
returns the first adapter that matches the model.
"""

from __future__ import annotations

import importlib

from torch import nn

from epmq.errors import EpmqError
from epmq.models.adapter import (
    BlockAdapter,
    Stage,
    StopForward,
    register_adapter,
    registered_adapters,
)

FAMILY_MODULES = ("bert", "clip", "t5", "llama")

__all__ = [
    "FAMILY_MODULES",
    "BlockAdapter",
    "Stage",
    "StopForward",
    "adapter_for",
    "register_adapter",
    "registered_adapters",
]


def _import_families() -> None:
    for name in FAMILY_MODULES:
        module = f"epmq.models.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency inside the module is a bug
                raise


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The registered adapter for ``model`` (matched on ``config.model_type``)."""
    _import_families()
    for cls in registered_adapters():
        if cls.matches(model):
            return cls()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = sorted({t for cls in registered_adapters() for t in cls.model_types})
    raise EpmqError(
        f"no adapter for model {type(model).__name__} (model_type={model_type!r}); "
        f"supported model types: {', '.join(known) or 'none'}"
    )
