"""Model merging: registered methods over state dicts, in memory or streamed from disk.

Methods (see :func:`list_methods`, :func:`describe_method`): ``average``, ``task_arithmetic``,
``ties``, ``dare``, ``regmean``. Each is a plain function over the tensors of one parameter,
in its own module under :mod:`epmq.merging.methods`.

- :func:`merge` merges in-memory state dicts.
- :func:`merge_checkpoints` merges Hugging Face folders tensor by tensor (lazy safetensors
  reads), writing a folder that ``from_pretrained`` loads plus ``merge_record.json``.
"""

from __future__ import annotations

from epmq.merging.engine import MergePlan, make_plan, merge
from epmq.merging.registry import (
    MergeMethod,
    Param,
    TensorContext,
    describe_method,
    get_method,
    list_methods,
    register_method,
)
from epmq.merging.streaming import merge_checkpoints

__all__ = [
    "MergeMethod",
    "MergePlan",
    "Param",
    "TensorContext",
    "describe_method",
    "get_method",
    "list_methods",
    "make_plan",
    "merge",
    "merge_checkpoints",
    "register_method",
]
