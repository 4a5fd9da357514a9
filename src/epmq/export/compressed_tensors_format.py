"""compressed-tensors ``pack-quantized`` layout (what transformers and vLLM load natively).

Per quantized ``Linear`` named ``m`` (weight ``[out, in]``, ``b`` bits, ``G`` groups)::

    m.weight_packed      int32 [out, ceil(in*b/32)]  signed codes s = q - 2**(b-1), stored as
                                                     s + 2**(b-1) = q, packed densely along `in`
                                                     (element i at bits i*b, see packing.py)
    m.weight_scale       float [out, G]              (G = 1 for the "channel" strategy)
    m.weight_shape       int64 [2]                   = [out, in]
    m.weight_zero_point  int32 [ceil(out*b/32), G]   asymmetric only: signed zero points
                                                     z - 2**(b-1), offset back to z and
                                                     packed densely along `out` (dim 0)

compressed-tensors dequantizes ``w = scale * (s - zp_signed)``; epmq's unsigned convention is
``w = scale * (q - z)``, and ``s - zp_signed = (q - 2**(b-1)) - (z - 2**(b-1)) = q - z``, so the
mapping is exact. A symmetric compressed-tensors scheme has no stored zero point (it is 0 in
the signed range), which is epmq's symmetric grid ``z = 2**(b-1)``.

Act-order: a result whose ``g_idx`` is not ``j // group_size`` is refused. Checked against
compressed-tensors 0.20 (``quantization/quant_args.py``) and transformers 5.23 on CPU: the only
scheme that carried ``weight_g_idx`` was ``actorder="group"``, and 0.20's ``QuantizationArgs``
validator rejects it ("actorder='group' has been removed"), so such a config.json fails to load;
with ``actorder="weight"`` (which only changes the calibration order) or none, a stored
``weight_g_idx`` is ignored and every column would be dequantized with the scale of group
``j // group_size``, i.e. wrongly. No pack-quantized layout carries a column permutation, so:
quantize with static groups (``--static-groups``) or without act-order, or export as ``gptq``,
whose ``g_idx`` stores any order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from epmq.errors import EpmqError
from epmq.export.packing import pack_int32, unpack_int32
from epmq.export.quantized import QuantizedWeight, default_g_idx

FORMAT = "pack-quantized"
# The version stamped into quantization_config when the package itself is not installed.
FALLBACK_CT_VERSION = "0.20.0"


# Why act-order cannot be exported as compressed-tensors (see the module docs).
ACT_ORDER_REASON = (
    "compressed-tensors 0.20 rejects actorder='group', the only scheme with weight_g_idx, and "
    "ignores a stored weight_g_idx otherwise, which would dequantize columns in the wrong groups"
)


def check_representable(q: QuantizedWeight) -> None:
    """Refuse what pack-quantized cannot store (act-order groups)."""
    if q.act_order:
        raise EpmqError(
            f"{q.name}: act-order g_idx (columns not in group order) cannot be stored as "
            f"compressed-tensors ({ACT_ORDER_REASON}); quantize with static groups or without "
            "act-order, or export with format 'gptq', which stores g_idx"
        )


def pack_module(q: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of one module, keyed by local name (``weight_packed``, ``weight_scale``...)."""
    check_representable(q)
    out_f, in_f = q.shape
    tensors = {
        "weight_packed": pack_int32(q.codes, q.bits, dim=1, name=f"{q.name}.codes"),
        "weight_scale": q.scales.to(dtype),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not q.symmetric:
        tensors["weight_zero_point"] = pack_int32(q.zeros, q.bits, dim=0, name=f"{q.name}.zeros")
    return tensors


def unpack_module(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_module`: ``(codes, scales float32, zeros, g_idx)`` in epmq terms."""
    out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
    codes = unpack_int32(tensors["weight_packed"], bits, in_f, dim=1)
    scales = tensors["weight_scale"].to(torch.float32)
    if symmetric:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_int32(tensors["weight_zero_point"], bits, out_f, dim=0)
    return codes, scales, zeros, default_g_idx(in_f, group_size)


def scheme_weights(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of a scheme, as compressed-tensors serialises them."""
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": group_size if group_size > 0 else None,
        "strategy": "group" if group_size > 0 else "channel",
        "dynamic": False,
        "observer": "minmax",
    }


def quantization_config(
    weights: Mapping[str, QuantizedWeight], linear_names: list[str]
) -> dict[str, Any]:
    """``quantization_config`` for config.json (``quant_method: compressed-tensors``).

    One scheme → one config group targeting ``Linear`` with every non-quantized linear in
    ``ignore``. Mixed bit-widths/grids → one group per scheme targeting module names exactly.
    """
    schemes: dict[tuple[int, int, bool], list[str]] = {}
    for name, q in weights.items():
        schemes.setdefault((q.bits, q.group_size, q.symmetric), []).append(name)
    groups: dict[str, Any] = {}
    for i, ((bits, group_size, symmetric), names) in enumerate(schemes.items()):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(schemes) == 1 else sorted(names),
            "weights": scheme_weights(bits, group_size, symmetric),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    try:
        import compressed_tensors

        version = str(compressed_tensors.__version__)
    except ImportError:
        version = FALLBACK_CT_VERSION
    return {
        "config_groups": groups,
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": sorted(n for n in linear_names if n not in weights),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }
