"""Lazy, tensor-by-tensor reading of Hugging Face checkpoint folders.

A folder holds ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
``pytorch_model.bin`` (optionally sharded with ``pytorch_model.bin.index.json``; a
``head.safetensors`` beside it is not the model), or one other ``*.safetensors`` file.
Headers (names, shapes, dtypes) are read up front without data; each
:meth:`CheckpointReader.get` opens the file with ``safetensors.safe_open``, copies one tensor
out and closes the file again, so no mapping keeps pages of a whole model resident.
Pickled ``.bin`` checkpoints cannot be read lazily: they are loaded whole (with a note).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

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


def safetensors_files(folder: Path) -> list[str] | None:
    """The safetensors weight files of a model folder, or None when its weights are pickled
    ``.bin`` files. A lone ``*.safetensors`` file of another name counts only when the folder
    has no ``.bin`` weights (beside them it is e.g. a task head, not the model)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise EpmqError(f"{index}: not a safetensors index ({err})") from None
        files = list(dict.fromkeys(weight_map.values()))
        for file in files:
            if not (folder / file).is_file():
                raise EpmqError(f"{index}: shard {file} is missing")
        return files
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
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    piece = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise EpmqError(f"{path}: tensor {name!r} has unsupported dtype")
                    if name in self.file_of:
                        raise EpmqError(f"{path}: tensor {name!r} also in {self.file_of[name]}")
                    self.meta[name] = TensorMeta(tuple(piece.get_shape()), dtype)
                    self.file_of[name] = file
        except EpmqError:
            raise
        except Exception as err:
            raise EpmqError(f"{path}: cannot read safetensors header ({err})") from None

    def _load_bin(self) -> None:
        index = self.folder / BIN_INDEX
        if index.is_file():
            files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / BIN_SINGLE).is_file():
            files = [BIN_SINGLE]
        else:
            raise EpmqError(f"{self.folder}: no {SAFE_SINGLE}, {SAFE_INDEX} or {BIN_SINGLE} found")
        log.warning("%s: only pickled %s weights; loading them whole", self.folder, BIN_SINGLE)
        self._loaded = {}
        for file in files:
            try:
                state = torch.load(self.folder / file, map_location="cpu", weights_only=True)
            except Exception as err:
                raise EpmqError(f"{self.folder / file}: cannot load ({err})") from None
            for name, tensor in state.items():
                self._loaded[name] = tensor
                self.meta[name] = TensorMeta.of(tensor)
                self.file_of[name] = file

    @property
    def is_safetensors(self) -> bool:
        return self._loaded is None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor; the file is closed again)."""
        if self._loaded is not None:
            return self._loaded[name]
        if name not in self.file_of:
            raise EpmqError(f"{self.folder}: no tensor {name!r}")
        with safe_open(str(self.folder / self.file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def shards(self) -> dict[str, list[str]]:
        """Output layout: the base's safetensors shards, or one ``model.safetensors``."""
        if not self.is_safetensors:
            return {SAFE_SINGLE: list(self.meta)}
        layout: dict[str, list[str]] = {}
        for name, file in self.file_of.items():
            layout.setdefault(file, []).append(name)
        return layout
