"""Task heads per model family: how a user's classification task is fed to a model and scored.

- ``bert``: linear head file on the pooled encoder output (:mod:`epmq.heads.encoder`);
- ``clip``: zero-shot text heads or linear heads on image embeddings (:mod:`epmq.heads.clip`);
- ``t5``: label words scored by the decoder; ``llama``: label words scored as continuations
  (:mod:`epmq.heads.text_to_text`).

:func:`family_tasks` builds the family's :class:`~epmq.heads.base.FamilyTasks` object.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from epmq.errors import EpmqError
from epmq.heads.base import FamilyTasks

# family → (module, class)
FAMILY_TASKS: dict[str, tuple[str, str]] = {
    "bert": ("epmq.heads.encoder", "EncoderTasks"),
    "clip": ("epmq.heads.clip", "ClipTasks"),
    "t5": ("epmq.heads.text_to_text", "T5Tasks"),
    "llama": ("epmq.heads.text_to_text", "CausalLMTasks"),
}

__all__ = ["FAMILY_TASKS", "FamilyTasks", "family_tasks"]


def family_tasks(family: str, base_dir: str | Path, config: Any) -> FamilyTasks:
    """The task logic of ``family`` for the base model in ``base_dir``."""
    if family not in FAMILY_TASKS:
        raise EpmqError(f"unknown model family {family!r}; choose one of {', '.join(FAMILY_TASKS)}")
    module, cls = FAMILY_TASKS[family]
    return getattr(importlib.import_module(module), cls)(Path(base_dir), config)
