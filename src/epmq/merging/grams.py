"""Per-task Gram matrices on disk: one safetensors file, one stacked tensor per weight.

``save_grams(path, {"layer.weight": [G_1, ..., G_K]})`` stores each weight's Grams stacked as
``(K, d_in, d_in)``; :class:`GramFile` reads them back lazily as a mapping from weight name to
the list of K matrices, so :func:`epmq.merging.merge_checkpoints` holds one weight's Grams at a
time. This is how ``epmq merge --method regmean --grams FILE`` gets its statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from epmq.atomic import save_tensors
from epmq.errors import EpmqError


def save_grams(
    path: str | Path, grams: Mapping[str, Sequence[torch.Tensor]], *, force: bool = False
) -> Path:
    """Write per-task Grams (stacked per weight) to one safetensors file."""
    stacked = {name: torch.stack([g.float() for g in mats]) for name, mats in grams.items()}
    return save_tensors(path, stacked, {"format": "epmq-grams"}, force=force)


class GramFile(Mapping[str, list[torch.Tensor]]):
    """Lazy mapping: weight name -> list of K Gram matrices, read on access."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EpmqError(f"grams file {self.path} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                self._names = list(handle.keys())
                shapes = {n: handle.get_slice(n).get_shape() for n in self._names}
        except Exception as err:
            raise EpmqError(f"grams file {self.path}: not a safetensors file ({err})") from None
        for name, shape in shapes.items():
            if len(shape) != 3 or shape[1] != shape[2]:
                raise EpmqError(
                    f"grams file {self.path}: {name!r} has shape {shape}, expected [K, d, d]"
                )

    def __getitem__(self, name: str) -> list[torch.Tensor]:
        if name not in self._names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as handle:
            return list(handle.get_tensor(name).unbind(0))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
