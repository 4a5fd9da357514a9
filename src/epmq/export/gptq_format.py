"""GPTQ checkpoint layout, checkpoint formats ``gptq`` (v1) and ``gptq_v2``.

Per quantized ``Linear`` named ``m`` (weight ``[out, in]``, ``b`` bits, ``G`` groups)::

    m.qweight  int32 [ceil(in*b/32), out]   codes q transposed to [in, out], packed densely
                                            along `in` (dim 0; 3 bits cross words, packing.py)
    m.qzeros   int32 [G, ceil(out*b/32)]    stored zero points transposed to [G, out], packed
                                            along `out`: z - 1 (v1) or z (v2)
    m.scales   fp16  [G, out]
    m.g_idx    int32 [in]                   group of each input column (act-order: any order)
    m.bias     fp16  [out]                  unchanged, when the layer has one

Readers dequantize ``w[j, o] = scales[g[j], o] * (q[j, o] - z[g[j], o])``.

The two checkpoint formats differ only in ``qzeros``, and ``quantization_config`` (=
``quantize_config.json``) names the one used in ``"checkpoint_format"``:

- ``gptq`` (v1): AutoGPTQ's original packer stored ``z - 1`` and every v1 reader adds 1 back. A
  symmetric 4-bit grid (z = 8) stores 7 (the familiar ``0x77777777`` words). A zero point of 0
  would be stored as -1, which does not fit in ``b`` unsigned bits, so v1 cannot hold every
  asymmetric grid: such a module is refused, naming it. Every GPTQ runtime reads v1.
- ``gptq_v2``: ``z`` stored as is (what GPTQModel writes with ``format="gptq_v2"``; it is also
  GPTQModel's in-memory format: it adds 1 to v1 zeros on load), so every zero point in
  ``[0, 2**b - 1]`` fits. Readers: GPTQModel (every kernel); transformers through optimum with
  the gptqmodel backend (transformers' ``GPTQConfig``: "``gptq_v2`` is gptqmodel only"); vLLM's
  ``gptq`` linear method (``gptq_gemm``, 2/3/4/8 bits, symmetric or not), which honours
  ``"checkpoint_format": "gptq_v2"`` since vllm-project/vllm#26092. Older vLLM, AutoGPTQ and
  ExLlama/ExLlamaV2 know only v1 and would read v2 zeros off by one step.

Format ``gptq`` (the default) writes v1 for symmetric grids, for the widest reach, and
``gptq_v2`` for asymmetric ones; format ``gptq-v1`` always writes v1 (for v1-only runtimes; it
refuses zero points of 0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from epmq.errors import EpmqError
from epmq.export.packing import pack_int32, unpack_int32
from epmq.export.quantized import QuantizedWeight

V1, V2 = "gptq", "gptq_v2"
CHECKPOINT_FORMATS = (V1, V2)


def default_checkpoint_format(symmetric: bool) -> str:
    """``gptq`` (v1) for a symmetric grid, ``gptq_v2`` for an asymmetric one."""
    return V1 if symmetric else V2


def zero_offset(checkpoint_format: str) -> int:
    """What is subtracted from a zero point before it is stored: 1 (v1) or 0 (v2)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise EpmqError(
            f"unknown GPTQ checkpoint format {checkpoint_format!r}; use one of "
            f"{', '.join(CHECKPOINT_FORMATS)}"
        )
    return 1 if checkpoint_format == V1 else 0


def pack_module(
    q: QuantizedWeight,
    dtype: torch.dtype = torch.float16,
    *,
    checkpoint_format: str | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of one module keyed by local name. GPTQ readers expect fp16 ``scales``.

    ``checkpoint_format`` is ``gptq`` (v1) or ``gptq_v2``; by default it follows the grid
    (:func:`default_checkpoint_format`).
    """
    del dtype  # the layout fixes scales to float16
    fmt = checkpoint_format or default_checkpoint_format(q.symmetric)
    offset = zero_offset(fmt)
    if offset and bool((q.zeros == 0).any()):
        out_ch, group = (int(v) for v in torch.nonzero(q.zeros == 0)[0])
        raise EpmqError(
            f"{q.name}.zeros: zero point 0 (output channel {out_ch}, group {group}) cannot be "
            "stored in GPTQ v1, which stores zero - 1; export with format 'gptq' (it writes "
            "gptq_v2 for asymmetric grids) or use a symmetric grid"
        )
    return {
        "qweight": pack_int32(q.codes.t(), q.bits, dim=0, name=f"{q.name}.codes"),
        "qzeros": pack_int32((q.zeros - offset).t(), q.bits, dim=1, name=f"{q.name}.zeros"),
        "scales": q.scales.t().to(torch.float16),
        "g_idx": q.g_idx.to(torch.int32),
    }


def unpack_module(
    tensors: Mapping[str, torch.Tensor], bits: int, checkpoint_format: str = V1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_module`: ``(codes, scales float32, zeros, g_idx)`` in epmq terms."""
    offset = zero_offset(checkpoint_format)
    scales = tensors["scales"].t().to(torch.float32)  # [out, G]
    g_idx = tensors["g_idx"].to(torch.int32)
    out_f, in_f = scales.shape[0], g_idx.shape[0]
    codes = unpack_int32(tensors["qweight"], bits, in_f, dim=0).t()
    zeros = unpack_int32(tensors["qzeros"], bits, out_f, dim=1).t() + offset
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
    weights: Mapping[str, QuantizedWeight],
    linear_names: list[str],
    *,
    checkpoint_format: str | None = None,
) -> dict[str, Any]:
    """``quantization_config`` (config.json) = ``quantize_config.json`` for GPTQ readers.

    GPTQ has one grid per checkpoint: mixed bits, group sizes or symmetry are refused.
    ``checkpoint_format`` as in :func:`pack_module`.
    """
    del linear_names
    grids = {(q.bits, q.group_size, q.symmetric) for q in weights.values()}
    if len(grids) != 1:
        raise EpmqError(
            f"gptq export needs one grid for every module, got {sorted(grids)} "
            "(bits, group_size, symmetric); use format 'compressed-tensors' for mixed grids"
        )
    bits, group_size, symmetric = grids.pop()
    fmt = checkpoint_format or default_checkpoint_format(symmetric)
    zero_offset(fmt)  # a known format
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
        "checkpoint_format": fmt,
        "meta": {"quantizer": ["epmq"]},
    }
    block, inner = _blocks(sorted(weights))
    if block is not None:
        config["block_name_to_quantize"] = block
        config["modules_in_block_to_quantize"] = inner
    return config
