"""Model families, looked up by name, by ``model_type``, by folder or by model.

Every answer is derived from the registered adapter classes (:mod:`epmq.models.adapter`): each
declares its ``family``, ``model_types``, loader and task heads, and nothing here repeats them.
The family modules are the modules of this package that register an adapter; they are all
imported on the first lookup, so adding a family is adding its module (and its heads class).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from torch import nn

from epmq.errors import EpmqError
from epmq.models.adapter import BlockAdapter, registered_adapters
from epmq.models.folder import read_config


def _import_families() -> None:
    import epmq.models as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")


def families() -> dict[str, type[BlockAdapter]]:
    """Every family's adapter class, by family name, in registration order."""
    _import_families()
    return {cls.family: cls for cls in registered_adapters()}


def model_types() -> dict[str, str]:
    """Every supported ``config.model_type`` → its family."""
    return {t: name for name, cls in families().items() for t in cls.model_types}


def adapter_class(family: str) -> type[BlockAdapter]:
    """The adapter class of ``family`` (``bert``, ``clip``, ``t5``, ``llama``, ...)."""
    known = families()
    if family not in known:
        raise EpmqError(f"unknown model family {family!r}; choose one of {', '.join(known)}")
    return known[family]


def read_model_type(folder: str | Path) -> str:
    """``model_type`` from ``folder/config.json`` (:class:`EpmqError` naming what is wrong)."""
    model_type = read_config(folder).get("model_type")
    if not isinstance(model_type, str):
        raise EpmqError(f"{Path(folder) / 'config.json'} has no 'model_type' field")
    return model_type


def detect_family(folder: str | Path) -> str:
    """The family of the model saved in ``folder``, from its ``config.json`` ``model_type``."""
    model_type = read_model_type(folder)
    known = model_types()
    if model_type not in known:
        raise EpmqError(
            f"{Path(folder)}: model_type {model_type!r} is not supported; supported types: "
            f"{', '.join(sorted(known))}"
        )
    return known[model_type]


def adapter_for_folder(folder: str | Path) -> BlockAdapter:
    """An adapter instance for the model saved in ``folder``."""
    return adapter_class(detect_family(folder))()


def load_model(folder: str | Path, **kwargs: Any) -> tuple[nn.Module, BlockAdapter]:
    """Load the model in ``folder`` (eval mode, local files only) and its adapter."""
    adapter = adapter_for_folder(folder)
    return adapter.load(folder, **kwargs), adapter


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The registered adapter for ``model`` (matched on ``config.model_type``)."""
    for cls in families().values():
        if cls.matches(model):
            return cls()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise EpmqError(
        f"no adapter for model {type(model).__name__} (model_type={model_type!r}); "
        f"supported model types: {', '.join(sorted(model_types())) or 'none'}"
    )
