"""Lazy, tensor-by-tensor reading of Hugging Face checkpoint folders.

A folder holds ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
``pytorch_model.bin`` (optionally sharded with ``pytorch_model.bin.index.json``; a
``head.safetensors`` beside it is not the model), or one other ``*.safetensors`` file.
Headers (names, shapes, dtypes) are read up front without data; each
:meth:`CheckpointReader.get` opens the file with ``safetensors.safe_open``, copies one tensor
out and closes the file again, so no mapping keeps pages of a whole model resident.
Pickled ``.bin`` checkpoints cannot be read lazily: they are loaded whole, only through torch's
weights-only loader (never a full unpickling: a file that needs one is refused naming it), with
one log line per folder suggesting conversion to safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from epmq.errors import EpmqError
from epmq.merging.validation import TensorMeta

log = logging.getLogger("epmq.merging")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
#: folders whose pickled weights were already noted in the log (one line per folder and run)
_NOTED_BIN_FOLDERS: set[Path] = set()
#: float8 checkpoints store scales beside their weights (or need them): not read as plain floats
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a file that is not safetensors (truncated, garbage, a header with
    bad JSON or offsets past its end), here or while reading it, is an :class:`EpmqError`
    naming the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise EpmqError(f"{path}: not a readable safetensors file ({reason})") from None


def shard_files(index: Path) -> list[str]:
    """The shard files an index (``model.safetensors.index.json`` or
    ``pytorch_model.bin.index.json``) maps tensors to, in order; each must exist beside it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, RecursionError) as err:
        raise EpmqError(f"{index}: not valid JSON ({err})") from None
    except (KeyError, TypeError):
        raise EpmqError(f"{index}: no 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise EpmqError(f"{index}: 'weight_map' is not an object of tensor name to file name")
    files = list(dict.fromkeys(weight_map.values()))
    for file in files:
        if not (index.parent / file).is_file():
            raise EpmqError(f"{index}: shard {file} is missing")
    return files


def safetensors_files(folder: Path) -> list[str] | None:
    """The safetensors weight files of a model folder, or None when its weights are pickled
    ``.bin`` files. A lone ``*.safetensors`` file of another name counts only when the folder
    has no ``.bin`` weights (beside them it is e.g. a task head, not the model)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        return shard_files(index)
    if (folder / SAFE_SINGLE).is_file():
        return [SAFE_SINGLE]
    if (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file():
        return None
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if len(found) > 1:
        raise EpmqError(
            f"{folder}: several .safetensors files ({', '.join(found)}) and no {SAFE_INDEX}"
        )
    return None


def bin_files(folder: Path) -> list[str]:
    """The pickled ``.bin`` weight files of a model folder (its index's shards, or
    ``pytorch_model.bin``); empty when it has none."""
    index = folder / BIN_INDEX
    if index.is_file():
        return shard_files(index)
    return [BIN_SINGLE] if (folder / BIN_SINGLE).is_file() else []


def load_bin(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a pickled weights file, read with ``torch.load(weights_only=True)``
    (``mmap``: tensors mapped, not read, for a zip-format file). A file that needs a full
    unpickling (objects other than tensors) or cannot be read is an :class:`EpmqError` naming
    it; epmq never unpickles arbitrary objects."""
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        why = _why(err)
        if "Weights only load failed" in str(err):
            raise EpmqError(
                f"{path}: loading it needs a full unpickling ({why}), which epmq never does; "
                "save the model's weights as safetensors (model.safetensors)"
            ) from None
        raise EpmqError(f"{path}: not a readable PyTorch weights file ({why})") from None
    if not isinstance(state, dict):
        raise EpmqError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise EpmqError(f"{path}: entry {name!r} is not a tensor")
    return state


def note_bin_weights(folder: Path) -> None:
    """One log line per folder: its weights are pickled, read whole; suggest safetensors."""
    key = folder.resolve()
    if key in _NOTED_BIN_FOLDERS:
        return
    _NOTED_BIN_FOLDERS.add(key)
    log.warning(
        "%s: pickled .bin weights, read whole with torch's weights-only loader; convert them "
        "to safetensors (save_pretrained of the loaded model) to have them read tensor by tensor",
        folder,
    )


def check_weight_files(folder: Path) -> None:
    """Raise :class:`EpmqError` naming the file when a weight file (or index) of ``folder``
    cannot be read: safetensors headers are read, not their data; pickled ``.bin`` weights
    are loaded weights-only and memory-mapped (a file that needs a full unpickling is
    refused here, before transformers sees it)."""
    files = safetensors_files(folder)
    pickled = bin_files(folder) if files is None else []
    index = folder / (SAFE_INDEX if files is not None else BIN_INDEX)  # the one read
    if index.is_file() and not isinstance(_read_json(index).get("metadata"), dict):
        raise EpmqError(  # transformers' loader reads it (epmq's own readers do not)
            f"{index}: no 'metadata' object (save_pretrained writes one; add \"metadata\": {{}})"
        )
    for file in files or ():
        with open_safetensors(folder / file):
            pass
    for file in pickled:
        load_bin(folder / file, mmap=True)
    if pickled:
        note_bin_weights(folder)


class CheckpointReader:
    """Names, shapes and dtypes of a checkpoint folder, and its tensors one at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EpmqError(f"checkpoint folder {self.folder} does not exist")
        self.file_of: dict[str, str] = {}
        self.meta: dict[str, TensorMeta] = {}
        self._loaded: dict[str, torch.Tensor] | None = None
        files = safetensors_files(self.folder)
        if files is not None:
            for file in files:
                self._read_header(file)
        else:
            self._load_bin()

    def _read_header(self, file: str) -> None:
        path = self.folder / file
        with open_safetensors(path) as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                piece = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise EpmqError(f"{path}: tensor {name!r} has unsupported dtype")
                if name in self.file_of:
                    raise EpmqError(f"{path}: tensor {name!r} also in {self.file_of[name]}")
                self._add(name, TensorMeta(tuple(piece.get_shape()), dtype), file)

    def _add(self, name: str, meta: TensorMeta, file: str) -> None:
        if meta.dtype in FLOAT8:
            raise EpmqError(
                f"{self.folder / file}: tensor {name!r} is {meta.dtype}; epmq reads float32, "
                "float16 and bfloat16 weights (dequantize a float8 checkpoint first)"
            )
        self.meta[name] = meta
        self.file_of[name] = file

    def _load_bin(self) -> None:
        files = bin_files(self.folder)
        if not files:
            raise EpmqError(f"{self.folder}: no {SAFE_SINGLE}, {SAFE_INDEX} or {BIN_SINGLE} found")
        self._loaded = {}
        for file in files:
            for name, tensor in load_bin(self.folder / file).items():
                self._add(name, TensorMeta.of(tensor), file)
                self._loaded[name] = tensor
        # after the load: a file that cannot be read is then the one line a user sees
        note_bin_weights(self.folder)

    @property
    def is_safetensors(self) -> bool:
        return self._loaded is None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor; the file is closed again)."""
        if self._loaded is not None:
            return self._loaded[name]
        if name not in self.file_of:
            raise EpmqError(f"{self.folder}: no tensor {name!r}")
        with open_safetensors(self.folder / self.file_of[name]) as handle:
            return handle.get_tensor(name)

    def shards(self) -> dict[str, list[str]]:
        """Output layout: the base's safetensors shards, or one ``model.safetensors``."""
        if not self.is_safetensors:
            return {SAFE_SINGLE: list(self.meta)}
        layout: dict[str, list[str]] = {}
        for name, file in self.file_of.items():
            layout.setdefault(file, []).append(name)
        return layout


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (anything else: an empty one; the callers that need its
    content check it and name the file)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError):
        return {}
    return content if isinstance(content, dict) else {}


def _why(err: BaseException) -> str:
    """The gist of a ``torch.load`` error on one line (torch's weights-only message wraps the
    unpickler's reason in advice to unpickle untrusted files, which epmq never does)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = text.split("Please use", 1)[0]  # advice to allow the global: never taken here
    return " ".join(text.split()) or type(err).__name__
