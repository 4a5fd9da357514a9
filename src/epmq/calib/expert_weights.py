"""Expert weights read tensor by tensor: experts are never loaded whole.

An :class:`ExpertWeights` source answers ``tensor(name)`` for a parameter name *of the merged
model*. Expert checkpoints are often saved from a different class than the merged model
(``BertModel`` → ``encoder.layer.0...`` vs ``BertForSequenceClassification`` →
``bert.encoder.layer.0...``), so names are resolved by the longest unique suffix match that
differs only in a leading, number-free prefix; the translation found is reused for the rest.
transformers 5 also renames some architectures' tensors when it loads them (ViT's
``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj`` in the model):
:meth:`ExpertWeights.read_as` applies the same renamings to the expert's own names.

Sources: :class:`SafetensorsExpert` (a folder with ``model.safetensors`` or sharded
``*.safetensors`` + index, opened lazily with ``safe_open``; pickled ``.bin`` weights cannot be
read lazily and are loaded whole) and :class:`StateDictExpert` (an in-memory state dict, for
tests and small models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.merging.checkpoint import CheckpointReader


class ExpertWeights:
    """Base class: a named expert whose tensors are read one at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._translation: tuple[int, str] | None = None  # (parts to drop, prefix to add)
        self._rename: Callable[[str], str] | None = None  # stored name -> the model's name
        self._stored: dict[str, str] = {}  # the model's naming of a stored name -> stored name

    # -- to implement ---------------------------------------------------------------------
    def keys(self) -> Iterable[str]:
        """The tensor names the expert holds (its own naming)."""
        raise NotImplementedError

    def _read(self, key: str) -> Tensor:
        """Read one tensor by the expert's own name."""
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------
    def read_as(self, model: nn.Module) -> None:
        """Name the stored tensors as transformers names them when it loads ``model``'s
        class (:func:`loading_renamer`; nothing changes where it renames nothing)."""
        self._rename = loading_renamer(model)
        self._translation = None
        self._keys_cache = None
        self._stored = {}

    def resolve(self, name: str) -> str:
        """The expert's key for the merged model's parameter ``name``."""
        keys = self._key_set()
        if name in keys:
            return name
        parts = name.split(".")
        if self._translation is not None:
            drop, prefix = self._translation
            candidate = prefix + ".".join(parts[drop:])
            if candidate in keys:
                return candidate
        # Only a leading prefix free of numbers may differ ("bert.", "model."): never drop
        # a block index, or a missing layer-0 tensor would resolve to layer 1's.
        numeric = [i for i, part in enumerate(parts) if part.isdigit()]
        max_drop = numeric[0] if numeric else len(parts) - 1
        for drop in range(max_drop + 1):
            suffix = ".".join(parts[drop:])
            matches = [k for k in keys if k == suffix or k.endswith("." + suffix)]
            if len(matches) == 1:
                key = matches[0]
                self._translation = (drop, key[: len(key) - len(suffix)])
                return key
            if len(matches) > 1:
                raise EpmqError(
                    f"expert {self.name!r}: tensor {name!r} is ambiguous "
                    f"({', '.join(sorted(matches)[:3])} ...)"
                )
        raise EpmqError(
            f"expert {self.name!r} has no tensor {name!r} (architecture differs from the model)"
        )

    def tensor(self, name: str, like: Tensor | None = None) -> Tensor:
        """The expert's value of the merged model's parameter ``name``.

        With ``like``, the shape must match (else :class:`EpmqError` naming expert and
        tensor) and the result takes ``like``'s dtype and device (read and checked on the
        host, then moved: :meth:`host_tensor`).
        """
        value = self.host_tensor(name, like)
        return value if like is None else value.to(like.device, non_blocking=True)

    def host_tensor(self, name: str, like: Tensor | None = None) -> Tensor:
        """:meth:`tensor` as read, on the CPU (cast to ``like``'s dtype, shape checked)."""
        key = self.resolve(name)
        value = self._read(self._stored.get(key, key))
        if like is not None:
            if tuple(value.shape) != tuple(like.shape):
                raise EpmqError(
                    f"expert {self.name!r}: tensor {name!r} has shape {tuple(value.shape)}, "
                    f"the model has {tuple(like.shape)} (architecture differs)"
                )
            value = value.to(like.dtype)
        if not torch.isfinite(value).all():
            raise EpmqError(f"expert {self.name!r}: tensor {name!r} holds NaN or Inf")
        return value

    def tensors(self, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The expert's values of every tensor in ``like`` (names of the merged model)."""
        return {name: self.tensor(name, ref) for name, ref in like.items()}

    def _key_set(self) -> set[str]:
        """The stored names, as the model names them (:meth:`read_as`)."""
        cached = getattr(self, "_keys_cache", None)
        if cached is None:
            if self._rename is None:
                cached = set(self.keys())
            else:
                self._stored = {self._rename(key): key for key in self.keys()}
                cached = set(self._stored)
            self._keys_cache = cached
        return cached

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class StateDictExpert(ExpertWeights):
    """An expert held in memory as a state dict (tests, small models)."""

    def __init__(self, state_dict: Mapping[str, Tensor], name: str = "expert") -> None:
        super().__init__(name)
        self._state = dict(state_dict)

    def keys(self) -> Iterable[str]:
        return self._state.keys()

    def _read(self, key: str) -> Tensor:
        return self._state[key].detach()


class SafetensorsExpert(ExpertWeights):
    """An expert saved as a Hugging Face folder of safetensors files, read lazily (a folder of
    pickled ``.bin`` weights is loaded whole, as :class:`~epmq.merging.checkpoint.
    CheckpointReader` does, ``weights_only``)."""

    def __init__(self, folder: str | Path, name: str | None = None) -> None:
        folder = Path(folder)
        super().__init__(name or folder.name)
        self.folder = folder
        self._reader = self._open(folder)

    def _open(self, folder: Path) -> CheckpointReader:
        if not folder.is_dir():
            raise EpmqError(f"expert {self.name!r}: {folder} is not a folder")
        try:  # the index and every header checked (or the .bin weights loaded) once, up front
            return CheckpointReader(folder)
        except EpmqError as exc:
            raise EpmqError(f"expert {self.name!r}: {exc}") from None

    def keys(self) -> Iterable[str]:
        return self._reader.file_of.keys()

    def _read(self, key: str) -> Tensor:
        # each tensor copied out of a file opened and closed again: no mapping keeps the
        # pages of K experts' blocks in the process's memory beside the copies
        try:
            return self._reader.get(key)
        except EpmqError as exc:  # changed on disk since its header was read
            raise EpmqError(f"expert {self.name!r}: cannot read {key!r}: {exc}") from None


def loading_renamer(model: nn.Module) -> Callable[[str], str] | None:
    """The renaming transformers applies to a stored tensor name when it loads ``model``'s
    class (its conversion mapping's plain renamings; None when there are none, or with a
    transformers that has no conversion mappings)."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
        from transformers.core_model_loading import rename_source_key
    except ImportError:
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except (AttributeError, TypeError, ValueError):  # not a transformers model
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if not renamings:
        return None
    return lambda key: rename_source_key(key, renamings, [])[0]


def as_expert(
    source: ExpertWeights | str | Path | Mapping[str, Tensor], name: str
) -> ExpertWeights:
    """Wrap a folder path or a state dict as an :class:`ExpertWeights` named ``name``."""
    if isinstance(source, ExpertWeights):
        return source
    if isinstance(source, (str, Path)):
        return SafetensorsExpert(source, name=name)
    if isinstance(source, Mapping):
        return StateDictExpert(source, name=name)
    raise EpmqError(f"expert {name!r}: cannot read weights from {type(source).__name__}")
