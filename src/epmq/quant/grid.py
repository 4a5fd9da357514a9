"""The quantization grid: per-row (and per-group) min-max affine integer grid.

A row ``w`` of a group is mapped to integer codes ``q = clamp(round(w / scale) + zero, 0, maxq)``
and back to ``scale * (q - zero)``. As in the GPTQ reference, the range always includes 0,
asymmetric grids use ``scale = (max - min) / maxq`` and ``zero = round(-min / scale)``,
symmetric grids use ``[-m, m]`` with ``m = max(|min|, max)`` and the fixed zero point
``(maxq + 1) / 2`` (the reference keeps ``min = 0`` for non-negative rows, which clips half the
row on a symmetric grid; here every symmetric row is centred).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from epmq.errors import EpmqError

MIN_BITS = 2
MAX_BITS = 16  # users get 2..8 from the CLI/config; higher is allowed for tests and studies


@dataclass(frozen=True)
class QuantGrid:
    """Integer grid with ``bits`` bits, ``group_size`` input columns per group (-1: whole row)."""

    bits: int
    group_size: int = -1
    symmetric: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise EpmqError(f"QuantGrid.bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise EpmqError(f"QuantGrid.bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise EpmqError(f"QuantGrid.group_size must be an int, got {self.group_size!r}")
        if self.group_size != -1 and self.group_size < 1:
            raise EpmqError(f"QuantGrid.group_size must be -1 or >= 1, got {self.group_size}")

    @property
    def maxq(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Number of column groups of a layer with ``in_features`` inputs."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size != 0:
            raise EpmqError(
                f"QuantGrid.group_size={self.group_size} does not divide in_features={in_features}"
            )
        return in_features // self.group_size

    def fit(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Min-max fit per row of ``w`` [out, cols]: returns ``scale`` [out], ``zero`` [out].

        ``zero`` is an integer-valued float. All-zero rows get the range [-1, 1] so their
        scale is positive (they still quantize exactly to 0 on asymmetric grids).
        """
        w = w.reshape(w.shape[0], -1)
        zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        xmin = torch.minimum(w.amin(dim=1), zeros)
        xmax = torch.maximum(w.amax(dim=1), zeros)
        if self.symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        dead = (xmin == 0) & (xmax == 0)
        xmin = torch.where(dead, -1.0, xmin)
        xmax = torch.where(dead, 1.0, xmax)
        scale = (xmax - xmin) / self.maxq
        if self.symmetric:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        return scale, zero

    def quantize(
        self, w: Tensor, scale: Tensor, zero: Tensor, *, out: Tensor | None = None
    ) -> Tensor:
        """Integer codes (as floats of ``w``'s dtype) ``clamp(round(w/scale) + zero, 0, maxq)``.

        ``scale``/``zero`` of shape [out] broadcast over the columns of a 2-D ``w``. With
        ``out`` the codes are written there (no allocation; a solver's inner loop).
        """
        scale, zero = _columnar(scale, w), _columnar(zero, w)
        return torch.div(w, scale, out=out).round_().add_(zero).clamp_(0, self.maxq)

    def dequantize(
        self, codes: Tensor, scale: Tensor, zero: Tensor, *, out: Tensor | None = None
    ) -> Tensor:
        """``scale * (codes - zero)``, broadcast as in :meth:`quantize` (into ``out`` if given)."""
        scale, zero = _columnar(scale, codes), _columnar(zero, codes)
        return torch.sub(codes.to(scale.dtype), zero, out=out).mul_(scale)

    def codes_dtype(self) -> torch.dtype:
        """Storage dtype of integer codes: uint8 up to 8 bits, int32 above."""
        return torch.uint8 if self.bits <= 8 else torch.int32


def _columnar(v: Tensor, like: Tensor) -> Tensor:
    """Shape a per-row vector [out] as [out, 1] when ``like`` is 2-D."""
    if like.dim() == 2 and v.dim() == 1:
        return v.unsqueeze(1)
    return v
