"""Task heads per model family: how a user's classification task is fed to a model and scored.

- ``bert``, ``distilbert``: a linear head file on the pooled encoder output, or the head inside
  a ``*ForSequenceClassification`` checkpoint (:mod:`epmq.heads.encoder`,
  :mod:`epmq.heads.sequence_classification`);
- ``clip``: zero-shot text heads, linear heads on image features or a
  ``CLIPForImageClassification``'s classifier (:mod:`epmq.heads.clip`);
- ``vit``: linear heads or a ``ViTForImageClassification``'s classifier (:mod:`epmq.heads.vit`);
  both image families share :mod:`epmq.heads.images`;
- ``t5``: label words scored by the decoder; ``llama``: label words scored as continuations
  (:mod:`epmq.heads.text_to_text`).

Which class serves a family is the family adapter's ``tasks`` declaration
(:class:`epmq.models.adapter.BlockAdapter`); :func:`tasks_class` resolves it and
:func:`family_tasks` builds the family's :class:`~epmq.heads.base.FamilyTasks` object.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from epmq.errors import EpmqError
from epmq.heads.base import ExpertFields, ExpertView, FamilyTasks, HeadOptions, TaskFields
from epmq.models.adapter import BlockAdapter
from epmq.models.registry import adapter_class

__all__ = [
    "ExpertFields",
    "ExpertView",
    "FamilyTasks",
    "HeadOptions",
    "TaskFields",
    "family_tasks",
    "tasks_class",
]


def tasks_class(adapter: type[BlockAdapter]) -> type[FamilyTasks]:
    """The :class:`FamilyTasks` subclass named by ``adapter.tasks`` (``"module:Class"``)."""
    if not adapter.tasks:
        raise EpmqError(f"model family {adapter.family!r} has no task heads; it cannot run tasks")
    module, _, name = adapter.tasks.partition(":")
    found = getattr(importlib.import_module(module), name, None)
    if not (isinstance(found, type) and issubclass(found, FamilyTasks)):
        raise TypeError(f"{adapter.__name__}.tasks = {adapter.tasks!r} is not a FamilyTasks class")
    return found


def family_tasks(family: str, base_dir: str | Path, options: HeadOptions) -> FamilyTasks:
    """The task logic of ``family`` for the base model in ``base_dir``."""
    adapter = adapter_class(family)
    return tasks_class(adapter)(adapter, Path(base_dir), options)
