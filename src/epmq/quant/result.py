"""The result every solver returns, and the one place that turns codes back into weights."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from epmq.quant.grid import QuantGrid
from epmq.quant.loss import proxy_loss


@dataclass
class QuantResult:
    """A quantized linear layer, shared by RTN, GPTQ and E-PMQ; export packs from these fields.

    Attributes:
        weight: dequantized weight [out, in]; float32 (float64 when the solver ran in float64).
            Always equal to :meth:`dequantize` (bit for bit). ``None`` once the calibration
            engine has written the layer into a model held in another dtype (bfloat16,
            float16): keeping a float32 copy of every linear would hold twice the model in
            memory; :meth:`dequantized` gives it back.
        codes: integer codes [out, in] in ``[0, grid.maxq]``; ``torch.uint8`` for bits <= 8,
            ``torch.int32`` above (see :meth:`QuantGrid.codes_dtype`). Convert before shifting.
        scales: [out, n_groups], same float dtype as ``weight``.
        zeros: [out, n_groups], integer-valued floats (the zero points).
        g_idx: int32 [in], the group of every input column (in original column order);
            all zeros per channel, ``j // group_size`` without act-order.
        grid: the grid used.
        proxy_loss: ``tr[(Q - W) H (Q - W)^T]`` w.r.t. the solver's target W and (undamped)
            Hessian H; ``nan`` when no Hessian was given.
        damping: percdamp actually used (after retries); 0 for RTN.
        damping_retries: how many times damping had to be raised for Cholesky to succeed.
        seconds: wall time of the solve.
    """

    weight: Tensor | None
    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    grid: QuantGrid
    proxy_loss: float
    damping: float
    damping_retries: int
    seconds: float

    def dequantize(self) -> Tensor:
        """``scales[:, g_idx[j]] * (codes[:, j] - zeros[:, g_idx[j]])`` for every column j."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.g_idx)

    def share_with(self, weight: Tensor) -> None:
        """Keep one copy of a solved linear: :attr:`weight` becomes the model's tensor
        ``weight`` when that holds the same values; in a model of another dtype (bfloat16,
        float16) it is dropped (:meth:`dequantized` recomputes it)."""
        kept = self.weight
        if kept is None or kept.dtype != weight.dtype:
            self.weight = None
        elif kept.shape == weight.shape and kept.device == weight.device and kept.equal(weight):
            self.weight = weight

    def dequantized(self) -> Tensor:
        """The dequantized weight: the one kept, or :meth:`dequantize` when it was dropped."""
        return self.weight if self.weight is not None else self.dequantize()


def build_result(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor,
    grid: QuantGrid,
    *,
    target: Tensor,
    hessian: Tensor | None,
    damping: float,
    damping_retries: int,
    start: float,
    weight: Tensor | None = None,
    loss: float | None = None,
) -> QuantResult:
    """Assemble a solver's :class:`QuantResult` from float-valued codes and their grid.

    The weight is dequantized from the codes (so it equals :meth:`QuantResult.dequantize`),
    unless the solver passes ``weight``, computed with the same per-element formula (bit for
    bit the same). The proxy loss is taken against ``target`` and ``hessian`` (``nan``
    without one) unless the solver passes ``loss``; ``seconds`` counts from ``start`` (a
    ``time.perf_counter()`` reading).
    """
    g_idx = g_idx.to(torch.int32)
    q = dequantize_codes(codes, scales, zeros, g_idx) if weight is None else weight
    if loss is None:
        loss = float("nan") if hessian is None else proxy_loss(q, target, hessian)
    return QuantResult(
        weight=q,
        codes=to_codes(codes, grid),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        grid=grid,
        proxy_loss=loss,
        damping=damping,
        damping_retries=damping_retries,
        seconds=time.perf_counter() - start,
    )


def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """Dequantize [out, in] codes with per-group ``scales``/``zeros`` selected by ``g_idx``."""
    idx = g_idx.long()
    return scales[:, idx] * (codes.to(scales.dtype) - zeros[:, idx])


def to_codes(codes: Tensor, grid: QuantGrid) -> Tensor:
    """Store float-valued integer codes in the grid's integer dtype."""
    return codes.to(torch.int32).to(grid.codes_dtype())
