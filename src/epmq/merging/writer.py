"""A safetensors file written one tensor at a time.

The header (names, dtypes, shapes, offsets) is known before any data, so the file can be
written sequentially with one tensor in memory: 8-byte little-endian header length, the JSON
header padded with spaces to a multiple of 8, then the raw tensor bytes in header order.
(:func:`epmq.atomic.save_tensors` serialises a whole file in memory, about three copies of a
shard.) Files are written inside an :func:`epmq.atomic.output_dir` partial folder, which makes
the whole output atomic.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch

from epmq.merging.checkpoint import SAFETENSORS_DTYPES
from epmq.merging.validation import TensorMeta

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def nbytes(meta: TensorMeta) -> int:
    """Bytes of a tensor with this shape and dtype."""
    return math.prod(meta.shape) * torch.empty((), dtype=meta.dtype).element_size()


class StreamingSafetensorsWriter:
    """Write ``layout`` (name, meta) tensors to ``path`` in that order via :meth:`add`."""

    def __init__(
        self,
        path: str | Path,
        layout: Sequence[tuple[str, TensorMeta]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._layout = list(layout)
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, meta in self._layout:
            size = nbytes(meta)
            header[name] = {
                "dtype": _DTYPE_NAMES[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        self.total_size = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(self.path, "wb")  # noqa: SIM115  (closed in close())
        self._file.write(struct.pack("<Q", len(text)))
        self._file.write(text)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; names, shapes and dtypes must follow the layout."""
        want_name, meta = self._layout[self._next]
        if name != want_name or tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ValueError(
                f"writer expected {want_name} {list(meta.shape)} {meta.dtype}, got {name} "
                f"{list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Flush and close; raises if some tensor of the layout was never written."""
        self._file.flush()
        self._file.close()
        if self._next != len(self._layout):
            raise ValueError(f"{self.path}: {len(self._layout) - self._next} tensors not written")

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
