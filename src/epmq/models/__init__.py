"""Model families: adapters that tell the calibration engine how to walk a model's blocks.

See :mod:`epmq.models.adapter` for the protocol. Each family module (``bert``, ``clip``,
``t5``, ``llama``) registers one adapter class, the family's whole description;
:mod:`epmq.models.registry` finds families by name, ``model_type``, folder or model, and
:func:`adapter_for` returns the adapter that matches a model.
"""

from __future__ import annotations

from epmq.models.adapter import (
    BlockAdapter,
    Stage,
    StopForward,
    register_adapter,
    registered_adapters,
)
from epmq.models.registry import adapter_for, families

__all__ = [
    "BlockAdapter",
    "Stage",
    "StopForward",
    "adapter_for",
    "families",
    "register_adapter",
    "registered_adapters",
]
