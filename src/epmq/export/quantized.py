"""The quantized weight of one linear layer, checked once before any format packs it.

Exports accept anything shaped like ``epmq.quant.QuantResult`` (duck-typed, so this package
does not depend on the solver): ``codes`` [out, in] in ``[0, maxq]``, ``scales`` and
``zeros`` [out, n_groups], ``g_idx`` [in] and ``grid`` (``bits``, ``group_size``,
``symmetric``), with dequantization ``w[:, j] = scales[:, g[j]] * (codes[:, j] - zeros[:, g[j]])``
(the GPTQ "unsigned codes with a zero point" convention). :func:`check_weight` validates all
of it and returns a :class:`QuantizedWeight` with canonical dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from epmq.errors import EpmqError


class GridLike(Protocol):
    bits: int
    group_size: int
    symmetric: bool


class ResultLike(Protocol):
    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    grid: GridLike


@dataclass(frozen=True)
class QuantizedWeight:
    """Validated parts of one quantized ``[out, in]`` weight."""

    name: str
    codes: torch.Tensor  # int32 [out, in], in [0, maxq]
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups], in [0, maxq]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1: one group per output channel
    symmetric: bool

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def act_order(self) -> bool:
        """True when ``g_idx`` is not the plain ``j // group_size`` (columns were reordered)."""
        return not torch.equal(self.g_idx, default_g_idx(self.shape[1], self.group_size))

    def dequantize(self) -> torch.Tensor:
        """Float32 ``[out, in]`` weight: ``scales[:, g] * (codes - zeros[:, g])``."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes - self.zeros[:, g]).to(torch.float32)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx`` without act-order: column ``j`` is in group ``j // group_size`` (all 0 if -1)."""
    j = torch.arange(in_features, dtype=torch.int32)
    return j // group_size if group_size > 0 else torch.zeros_like(j)


def _tensor(result: Any, field: str, name: str) -> torch.Tensor:
    value = getattr(result, field, None)
    if not isinstance(value, torch.Tensor):
        raise EpmqError(f"{name}: quantization result has no tensor field '{field}'")
    return value.detach().cpu()


def check_weight(
    name: str, result: ResultLike, weight_shape: tuple[int, ...] | None = None
) -> QuantizedWeight:
    """Validate one quantization result and return its canonical :class:`QuantizedWeight`.

    ``weight_shape`` is the shape of the module's weight in the model, when known. Every
    inconsistency raises :class:`EpmqError` naming the module and the field.
    """
    grid = getattr(result, "grid", None)
    if grid is None:
        raise EpmqError(f"{name}: quantization result has no 'grid'")
    bits, group_size = int(grid.bits), int(grid.group_size)
    symmetric = bool(grid.symmetric)
    maxq = (1 << bits) - 1
    codes = _tensor(result, "codes", name)
    scales = _tensor(result, "scales", name).to(torch.float32)
    zeros_f = _tensor(result, "zeros", name).to(torch.float64)
    g_idx = _tensor(result, "g_idx", name)
    if codes.ndim != 2:
        raise EpmqError(f"{name}.codes: expected [out, in], got shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    if weight_shape is not None and tuple(weight_shape) != (out_f, in_f):
        raise EpmqError(
            f"{name}.codes: shape {(out_f, in_f)} does not match the module weight "
            f"{tuple(weight_shape)}"
        )
    if codes.dtype.is_floating_point and not torch.equal(codes, codes.round()):
        raise EpmqError(f"{name}.codes: codes must be integers")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > maxq):
        raise EpmqError(f"{name}.codes: values outside [0, {maxq}] for {bits} bits")
    if group_size != -1 and group_size <= 0:
        raise EpmqError(f"{name}.grid.group_size: {group_size} (use -1 or a positive size)")
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    for field, t in (("scales", scales), ("zeros", zeros_f)):
        if tuple(t.shape) != (out_f, n_groups):
            raise EpmqError(
                f"{name}.{field}: expected shape {(out_f, n_groups)} for group_size {group_size}, "
                f"got {tuple(t.shape)}"
            )
    if not torch.isfinite(scales).all():
        raise EpmqError(f"{name}.scales: contains NaN or Inf")
    if not torch.equal(zeros_f, zeros_f.round()):
        raise EpmqError(f"{name}.zeros: zero points must be integer-valued")
    if zeros_f.numel() and (float(zeros_f.min()) < 0 or float(zeros_f.max()) > maxq):
        raise EpmqError(f"{name}.zeros: zero points outside [0, {maxq}] cannot be stored")
    zeros = zeros_f.to(torch.int32)
    if symmetric and not bool((zeros == (maxq + 1) // 2).all()):
        raise EpmqError(
            f"{name}.zeros: a symmetric grid needs every zero point = {(maxq + 1) // 2}"
        )
    if tuple(g_idx.shape) != (in_f,) or g_idx.dtype.is_floating_point:
        raise EpmqError(f"{name}.g_idx: expected an integer tensor of shape ({in_f},)")
    if in_f and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise EpmqError(f"{name}.g_idx: group indices outside [0, {n_groups})")
    q = QuantizedWeight(
        name=name,
        codes=codes.to(torch.int32),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
    weight = getattr(result, "weight", None)
    if isinstance(weight, torch.Tensor):
        expected = q.dequantize()
        tol = 1e-4 * float(expected.abs().max()) + 1e-8 if expected.numel() else 0.0
        if (
            weight.shape != expected.shape
            or float((weight.cpu().float() - expected).abs().max()) > tol
        ):
            raise EpmqError(
                f"{name}.weight: does not equal scales * (codes - zeros[g_idx]); "
                "the result's parts are inconsistent"
            )
    return q
