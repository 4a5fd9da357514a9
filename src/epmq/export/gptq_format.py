"""GPTQ checkpoint layout, format ``gptq`` (v1), as AutoGPTQ / GPTQModel / optimum read it.

Per quantized ``Linear`` named ``m`` (weight ``[out, in]``, ``b`` bits, ``G`` groups)::

    m.qweight  int32 [ceil(in*b/32), out]   codes q transposed to [in, out], packed densely
                                            along `in` (dim 0; 3 bits cross words, packing.py)
    m.qzeros   int32 [G, ceil(out*b/32)]    (z - 1) transposed to [G, out], packed along `out`
    m.scales   fp16  [G, out]
    m.g_idx    int32 [in]                   group of each input column (act-order: any order)
    m.bias     fp16  [out]                  unchanged, when the layer has one

Readers dequantize ``w[j, o] = scales[g[j], o] * (q[j, o] - (qzeros[g[j], o] + 1))``.

The "zero - 1" convention: AutoGPTQ's original packer stored ``z - 1`` and every v1 reader
adds 1 back (GPTQModel converts v1 to its internal ``gptq_v2`` by adding 1 on load). So a
symmetric 4-bit grid (z = 8) stores 7 (the familiar ``0x77777777`` words). A zero point of 0
would be stored as -1, which does not fit in ``b`` unsigned bits: it is refused, naming the
module (use a symmetric grid, or clamp zero points to >= 1 when quantizing).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from epmq.errors import EpmqError
from epmq.export.packing import pack_int32, unpack_int32
from epmq.export.quantized import QuantizedWeight

CHECKPOINT_FORMAT = "gptq"


def pack_module(q: QuantizedWeight, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Tensors of one module keyed by local name. GPTQ readers expect fp16 ``scales``."""
    del dtype  # the layout fixes scales to float16
    if bool((q.zeros == 0).any()):
        out_ch, group = (int(v) for v in torch.nonzero(q.zeros == 0)[0])
        raise EpmqError(
            f"{q.name}.zeros: zero point 0 (output channel {out_ch}, group {group}) cannot be "
            "stored in GPTQ v1, which stores zero - 1; use a symmetric grid or zero points >= 1"
        )
    return {
        "qweight": pack_int32(q.codes.t(), q.bits, dim=0, name=f"{q.name}.codes"),
        "qzeros": pack_int32((q.zeros - 1).t(), q.bits, dim=1, name=f"{q.name}.zeros"),
        "scales": q.scales.t().to(torch.float16),
        "g_idx": q.g_idx.to(torch.int32),
    }


def unpack_module(
    tensors: Mapping[str, torch.Tensor], bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_module`: ``(codes, scales float32, zeros, g_idx)`` in epmq terms."""
    scales = tensors["scales"].t().to(torch.float32)  # [out, G]
    g_idx = tensors["g_idx"].to(torch.int32)
    out_f, in_f = scales.shape[0], g_idx.shape[0]
    codes = unpack_int32(tensors["qweight"], bits, in_f, dim=0).t()
    zeros = unpack_int32(tensors["qzeros"], bits, out_f, dim=1).t() + 1
    return codes.contiguous(), scales, zeros.contiguous(), g_idx


def _blocks(names: list[str]) -> tuple[str | None, list[list[str]] | None]:
    """Common ``<block>.<i>.`` prefix of the quantized modules and their in-block names."""
    prefixes, inner = set(), set()
    for name in names:
        match = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
        if match is None:
            return None, None
        prefixes.add(match.group(1))
        inner.add(match.group(3))
    if len(prefixes) != 1:
        return None, None
    return prefixes.pop(), [sorted(inner)]


def quantization_config(
    weights: Mapping[str, QuantizedWeight], linear_names: list[str]
) -> dict[str, Any]:
    """``quantization_config`` (config.json) = ``quantize_config.json`` for GPTQ readers.

    GPTQ has one grid per checkpoint: mixed bits, group sizes or symmetry are refused.
    """
    del linear_names
    grids = {(q.bits, q.group_size, q.symmetric) for q in weights.values()}
    if len(grids) != 1:
        raise EpmqError(
            f"gptq export needs one grid for every module, got {sorted(grids)} "
            "(bits, group_size, symmetric); use format 'compressed-tensors' for mixed grids"
        )
    bits, group_size, symmetric = grids.pop()
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": any(q.act_order for q in weights.values()),
        "sym": symmetric,
        "lm_head": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "static_groups": False,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "meta": {"quantizer": ["epmq"]},
    }
    block, inner = _blocks(sorted(weights))
    if block is not None:
        config["block_name_to_quantize"] = block
        config["modules_in_block_to_quantize"] = inner
    return config
