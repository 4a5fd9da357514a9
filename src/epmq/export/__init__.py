"""epmq.export: deployable low-bit checkpoints that standard runtimes load.

Formats (see :mod:`epmq.export.formats`): ``compressed-tensors`` (pack-quantized; transformers
with the compressed-tensors package, vLLM), ``gptq`` (GPTQ layout: v1 for symmetric grids,
``gptq_v2`` for asymmetric ones; GPTQModel / optimum / vLLM, see
:mod:`epmq.export.gptq_format`), ``gptq-v1`` (v1 for every grid) and ``dequantized`` (plain
float checkpoint of the rounded weights).
"""

from epmq.export.checkpoint import export_checkpoint
from epmq.export.formats import FORMATS, ExportFormat, get_format, register_format
from epmq.export.packing import pack_int32, packed_length, unpack_int32
from epmq.export.quantized import QuantizedWeight, check_weight, default_g_idx
from epmq.export.sizes import (
    ExportSummary,
    float16_checkpoint_bytes,
    folder_files,
    format_bytes,
    read_summary,
    safetensors_bytes,
)

__all__ = [
    "FORMATS",
    "ExportFormat",
    "ExportSummary",
    "QuantizedWeight",
    "check_weight",
    "default_g_idx",
    "export_checkpoint",
    "float16_checkpoint_bytes",
    "folder_files",
    "format_bytes",
    "get_format",
    "pack_int32",
    "packed_length",
    "read_summary",
    "register_format",
    "safetensors_bytes",
    "unpack_int32",
]
