"""Registry of export formats by name: ``compressed-tensors``, ``gptq``, ``gptq-v1``,
``dequantized``.

A format turns each checked :class:`~epmq.export.quantized.QuantizedWeight` into the tensors
that replace the module's ``weight`` in the checkpoint, and builds the ``quantization_config``
written into config.json (``None`` for a plain float checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from epmq.errors import EpmqError
from epmq.export import compressed_tensors_format, gptq_format
from epmq.export.quantized import QuantizedWeight

PackFn = Callable[[QuantizedWeight, torch.dtype], dict[str, torch.Tensor]]
ConfigFn = Callable[[Mapping[str, QuantizedWeight], list[str]], "dict[str, Any] | None"]


@dataclass(frozen=True)
class ExportFormat:
    """How one checkpoint format stores quantized linear layers."""

    name: str
    description: str
    pack_module: PackFn
    quantization_config: ConfigFn
    # extra JSON files that hold a copy of quantization_config (e.g. quantize_config.json)
    config_files: tuple[str, ...] = ()


def _dequantized_module(q: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"weight": q.dequantize().to(dtype)}


def _no_config(weights: Mapping[str, QuantizedWeight], linear_names: list[str]) -> None:
    return None


FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to the registry (a name may be registered once)."""
    if fmt.name in FORMATS:
        raise ValueError(f"export format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    """The registered format called ``name``; an unknown name lists the valid ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise EpmqError(
            f"unknown export format {name!r}; valid formats: {', '.join(sorted(FORMATS))}"
        ) from None


register_format(
    ExportFormat(
        name="compressed-tensors",
        description="pack-quantized int32 (transformers + compressed-tensors, vLLM)",
        pack_module=compressed_tensors_format.pack_module,
        quantization_config=compressed_tensors_format.quantization_config,
    )
)
register_format(
    ExportFormat(
        name="gptq",
        description="GPTQ qweight/qzeros/scales/g_idx: v1 if symmetric, gptq_v2 if asymmetric",
        pack_module=gptq_format.pack_module,
        quantization_config=gptq_format.quantization_config,
        config_files=("quantize_config.json",),
    )
)
register_format(
    ExportFormat(
        name="gptq-v1",
        description="GPTQ v1 layout for every grid (v1-only runtimes; no zero point 0)",
        pack_module=partial(gptq_format.pack_module, checkpoint_format=gptq_format.V1),
        quantization_config=partial(
            gptq_format.quantization_config, checkpoint_format=gptq_format.V1
        ),
        config_files=("quantize_config.json",),
    )
)
register_format(
    ExportFormat(
        name="dequantized",
        description="plain float checkpoint of the rounded weights (loads anywhere)",
        pack_module=_dequantized_module,
        quantization_config=_no_config,
    )
)
