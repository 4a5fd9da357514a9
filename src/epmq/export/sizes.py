"""Checkpoint sizes on disk, and what a float16 checkpoint of the same model would take."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

# bytes per element of each safetensors dtype code
_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """Exact size of the safetensors file ``tensors`` would make, without writing it.

    With ``dtype``, floating-point tensors are counted as if cast to it (integer tensors keep
    their dtype), which gives the size of e.g. a float16 checkpoint of a float32 model.
    Layout: 8-byte header length, JSON header padded with spaces to a multiple of 8, data.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(tensors, key=lambda n: (-_itemsize(tensors[n], dtype), n)):
        t = tensors[name]
        t_dtype = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
        nbytes = t.numel() * t_dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES.get(t_dtype, str(t_dtype)),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    header_len = len(text.encode("utf-8"))
    header_len += (8 - header_len % 8) % 8
    return 8 + header_len + offset


def _itemsize(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return (dtype if dtype is not None and t.dtype.is_floating_point else t.dtype).itemsize


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with tied tensors (same storage) kept once, first name wins."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = t
    return tensors


def float16_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Size of a single-file float16 safetensors checkpoint of ``model`` (computed, not written)."""
    return safetensors_bytes(unique_state_dict(model), {"format": "pt"}, dtype=torch.float16)


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`~epmq.export.export_checkpoint` wrote, with sizes in bytes."""

    out_dir: Path
    format: str
    n_quantized: int
    bits: tuple[int, ...]
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes on disk
    float16_bytes: int = 0  # a float16 safetensors checkpoint of the same model

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def weights_bytes(self) -> int:
        return sum(n for name, n in self.files.items() if name.endswith(".safetensors"))

    @property
    def ratio_vs_float16(self) -> float:
        """Weights on disk / float16 weights (0.30 means 30% of the float16 size)."""
        return self.weights_bytes / self.float16_bytes if self.float16_bytes else float("nan")

    def report(self) -> str:
        """One line: format, bits, weights vs float16, total folder size."""
        bits = "/".join(str(b) for b in self.bits) or "-"
        return (
            f"{self.out_dir}: format {self.format}, {self.n_quantized} linear layers at {bits} "
            f"bits; weights {format_bytes(self.weights_bytes)} vs float16 "
            f"{format_bytes(self.float16_bytes)} ({100 * self.ratio_vs_float16:.1f}%), "
            f"folder {format_bytes(self.total_bytes)}"
        )


def format_bytes(n: int) -> str:
    """Human-readable size: ``1536`` -> ``'1.50 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"  # pragma: no cover


def folder_files(path: str | Path) -> dict[str, int]:
    """``{relative file name: bytes}`` for every file under ``path``."""
    root = Path(path)
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


# tensors that replace a quantized module's ``weight``, per layout
_PACKED_PARTS = {
    "weight_packed": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"),
    "qweight": ("qweight", "qzeros", "scales", "g_idx"),
}


def read_summary(out_dir: str | Path) -> ExportSummary:
    """Sizes of an exported folder, read back from disk (no model needed).

    The float16 reference size is rebuilt from the checkpoint itself: every quantized module
    (``weight_packed`` or ``qweight``) counts as a float16 ``weight`` of its original shape.
    """
    from safetensors import safe_open

    root = Path(out_dir)
    files = folder_files(root)
    shapes: dict[str, torch.Tensor] = {}
    bits: set[int] = set()
    n_quantized = 0
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                module, _, local = key.rpartition(".")
                if local not in _PACKED_PARTS:
                    continue
                n_quantized += 1
                for part in _PACKED_PARTS[local]:
                    keys.discard(f"{module}.{part}")
                if local == "weight_packed":
                    out_f, in_f = (int(v) for v in handle.get_tensor(f"{module}.weight_shape"))
                    words = handle.get_slice(key).get_shape()[1]
                else:
                    in_f = handle.get_slice(f"{module}.g_idx").get_shape()[0]
                    words, out_f = handle.get_slice(key).get_shape()
                bits.add(round(words * 32 / in_f))
                shapes[f"{module}.weight"] = torch.empty(out_f, in_f, device="meta")
            for key in keys:
                sl = handle.get_slice(key)
                dtype = _dtype_of(sl.get_dtype())
                shapes[key] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
    config = root / "config.json"
    qconfig = (
        json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    )
    fmt = "dequantized" if not qconfig else str(qconfig.get("quant_method", "unknown"))
    return ExportSummary(
        out_dir=root,
        format=fmt,
        n_quantized=n_quantized,
        bits=tuple(sorted(bits)),
        files=files,
        float16_bytes=safetensors_bytes(shapes, {"format": "pt"}, dtype=torch.float16),
    )


def _dtype_of(code: str) -> torch.dtype:
    for dtype, name in _SAFETENSORS_DTYPES.items():
        if name == code:
            return dtype
    return torch.float32
