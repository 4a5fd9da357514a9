"""Expert tensors read once and shared by every run of an experiment.

Every E-PMQ (and RegMean) run reads the experts' tensors of each block from their safetensors
files and checks them for NaN/Inf; an experiment with a dozen such variants repeats that read
and check a dozen times, and the check is the first touch of the memory-mapped file, so on a
busy machine it costs seconds per variant. :class:`CachedExpert` wraps any
:class:`ExpertWeights` source and keeps each tensor it served (read, checked, cast like the
model's tensor, copied into memory) for the later runs; the values are the source's, so
results do not change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from epmq.calib.expert_weights import ExpertWeights


class CachedExpert(ExpertWeights):
    """``source``'s tensors, each read and checked once, then served from memory."""

    def __init__(self, source: ExpertWeights) -> None:
        super().__init__(source.name)
        self.source = source
        self._served: dict[tuple[str, torch.dtype | None, tuple[int, ...] | None], Tensor] = {}

    def keys(self) -> Iterable[str]:
        return self.source.keys()

    def _read(self, key: str) -> Tensor:
        return self.source._read(key)

    def tensor(self, name: str, like: Tensor | None = None) -> Tensor:
        """:meth:`ExpertWeights.tensor` of the source, read once per name, dtype and shape."""
        key = (
            name,
            None if like is None else like.dtype,
            None if like is None else tuple(like.shape),
        )
        value = self._served.get(key)
        if value is None:
            value = self.source.tensor(name, like).clone()
            self._served[key] = value
        return value

    @property
    def nbytes(self) -> int:
        """Memory held by the served tensors."""
        return sum(t.numel() * t.element_size() for t in self._served.values())
