"""Expert tensors read once and shared by every run of an experiment.

Every E-PMQ (and RegMean) run reads the experts' tensors of each block from their safetensors
files and checks them for NaN/Inf; an experiment with a dozen such variants repeats that read
and check a dozen times, and the check is the first touch of the memory-mapped file, so on a
busy machine it costs seconds per variant. :class:`CachedExpert` wraps any
:class:`ExpertWeights` source and keeps each tensor it served (read, checked, cast like the
model's tensor, copied into memory) for the later runs; the values are the source's, so
results do not change.

The copies are bounded: every :class:`CachedExpert` of an experiment draws on one
:class:`CacheBudget` (by default a quarter of the machine's memory); once it is spent, further
tensors are served straight from the source, read again by every run, and never held.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from epmq.calib.expert_weights import ExpertWeights


def default_budget_bytes() -> int:
    """A quarter of the physical memory (4 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


class CacheBudget:
    """Bytes the expert caches of one experiment may hold together."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = default_budget_bytes() if max_bytes is None else int(max_bytes)
        self.used = 0
        #: Tensors served without being kept because the budget was spent.
        self.refused = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit; whether they did."""
        if self.used + nbytes > self.max_bytes:
            self.refused += 1
            return False
        self.used += nbytes
        return True


class CachedExpert(ExpertWeights):
    """``source``'s tensors, each read and checked once, then served from memory (while
    ``budget`` lasts; a private default-sized budget without one)."""

    def __init__(self, source: ExpertWeights, budget: CacheBudget | None = None) -> None:
        super().__init__(source.name)
        self.source = source
        self.budget = budget if budget is not None else CacheBudget()
        self._served: dict[tuple[str, torch.dtype | None, tuple[int, ...] | None], Tensor] = {}

    def keys(self) -> Iterable[str]:
        return self.source.keys()

    def read_as(self, model: nn.Module) -> None:
        self.source.read_as(model)

    def _read(self, key: str) -> Tensor:
        return self.source._read(key)

    def host_tensor(self, name: str, like: Tensor | None = None) -> Tensor:
        """:meth:`ExpertWeights.host_tensor` of the source, read once per name, dtype and
        shape (kept in CPU memory whatever device it is served to)."""
        key = (
            name,
            None if like is None else like.dtype,
            None if like is None else tuple(like.shape),
        )
        value = self._served.get(key)
        if value is None:
            value = self.source.host_tensor(name, like)
            if not self.budget.take(value.numel() * value.element_size()):
                return value
            value = value.clone()
            self._served[key] = value
        return value

    @property
    def nbytes(self) -> int:
        """Memory held by the served tensors."""
        return sum(t.numel() * t.element_size() for t in self._served.values())
