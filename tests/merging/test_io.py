"""Streaming safetensors writer, checkpoint reader and Gram files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.errors import EpmqError
from epmq.merging.checkpoint import CheckpointReader
from epmq.merging.grams import GramFile, save_grams
from epmq.merging.validation import TensorMeta
from epmq.merging.writer import StreamingSafetensorsWriter


def test_writer_round_trips_mixed_dtypes(tmp_path: Path) -> None:
    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(7, dtype=torch.int64),
        "h": torch.randn(2, 2, 2).half(),
        "s": torch.tensor(1.5),
        "m": torch.tensor([True, False]),
    }
    layout = [(n, TensorMeta.of(t)) for n, t in tensors.items()]
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", layout, {"format": "pt"}) as w:
        for name, tensor in tensors.items():
            w.add(name, tensor)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_refuses_out_of_layout_tensors(tmp_path: Path) -> None:
    layout = [("a", TensorMeta((2,), torch.float32))]
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", layout)
    with pytest.raises(ValueError, match="expected a"):
        writer.add("a", torch.zeros(3))
    with pytest.raises(ValueError, match="1 tensors not written"):
        writer.close()


def test_reader_headers_and_errors(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    assert reader.meta == {"w": TensorMeta((2, 3), torch.float32)}
    assert torch.equal(reader.get("w"), torch.ones(2, 3))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EpmqError, match=r"no model.safetensors"):
        CheckpointReader(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EpmqError, match="not a readable safetensors file"):
        CheckpointReader(bad)


def test_gram_file_round_trip(tmp_path: Path) -> None:
    grams = {"l.weight": [torch.eye(3), 2 * torch.eye(3)]}
    save_grams(tmp_path / "g.safetensors", grams)
    loaded = GramFile(tmp_path / "g.safetensors")
    assert list(loaded) == ["l.weight"] and len(loaded) == 1
    assert torch.equal(loaded["l.weight"][1], 2 * torch.eye(3))
    save_file({"x": torch.zeros(2, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(EpmqError, match=r"expected \[K, d, d\]"):
        GramFile(tmp_path / "bad.safetensors")
