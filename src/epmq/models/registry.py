"""Model families by name, and family detection from a model folder's ``config.json``.

``model_type`` → family: ``bert``/``roberta`` → ``bert``; ``clip``/``clip_vision_model`` →
``clip``; ``t5`` → ``t5``; ``llama``/``mistral``/``qwen2`` → ``llama``. Each family names its
adapter class (:mod:`epmq.models.adapter` protocol) and its loader, a function
``load_<family>(path, **kwargs)`` that calls ``from_pretrained`` on the local folder.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from epmq.errors import EpmqError
from epmq.models.adapter import BlockAdapter
from epmq.models.folder import read_config

# family → (module, adapter class, loader function)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "bert": ("epmq.models.bert", "BertAdapter", "load_bert"),
    "clip": ("epmq.models.clip", "ClipVisionAdapter", "load_clip"),
    "t5": ("epmq.models.t5", "T5Adapter", "load_t5"),
    "llama": ("epmq.models.llama", "LlamaAdapter", "load_llama"),
}

MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "clip": "clip",
    "clip_vision_model": "clip",
    "t5": "t5",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


def _check_family(family: str) -> tuple[str, str, str]:
    if family not in FAMILIES:
        raise EpmqError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def adapter_class(family: str) -> type[BlockAdapter]:
    """The adapter class of ``family`` (``bert``, ``clip``, ``t5``, ``llama``)."""
    module, cls, _ = _check_family(family)
    return getattr(importlib.import_module(module), cls)


def loader(family: str) -> Callable[..., nn.Module]:
    """The ``load_<family>(path, **kwargs)`` function of ``family``."""
    module, _, func = _check_family(family)
    return getattr(importlib.import_module(module), func)


def read_model_type(folder: str | Path) -> str:
    """``model_type`` from ``folder/config.json`` (:class:`EpmqError` naming what is wrong)."""
    model_type = read_config(folder).get("model_type")
    if not isinstance(model_type, str):
        raise EpmqError(f"{Path(folder) / 'config.json'} has no 'model_type' field")
    return model_type


def detect_family(folder: str | Path) -> str:
    """The family of the model saved in ``folder``, from its ``config.json`` ``model_type``."""
    model_type = read_model_type(folder)
    if model_type not in MODEL_TYPES:
        raise EpmqError(
            f"{Path(folder)}: model_type {model_type!r} is not supported; supported types: "
            f"{', '.join(sorted(MODEL_TYPES))}"
        )
    return MODEL_TYPES[model_type]


def adapter_for_folder(folder: str | Path) -> BlockAdapter:
    """An adapter instance for the model saved in ``folder``."""
    return adapter_class(detect_family(folder))()


def load_model(folder: str | Path, **kwargs: Any) -> tuple[nn.Module, BlockAdapter]:
    """Load the model in ``folder`` (eval mode, local files only) and its adapter."""
    family = detect_family(folder)
    model = loader(family)(folder, **kwargs)
    return model, adapter_class(family)()
