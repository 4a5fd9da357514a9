"""Bit packing: exact round trips; byte equality with the GPTQ and compressed-tensors packers."""

from __future__ import annotations

import pytest
import torch
from export_gptq_reference import autogptq_pack_rows

from epmq.errors import EpmqError
from epmq.export.packing import pack_int32, packed_length, unpack_int32

BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(64, 5), (96, 3)])
def test_matches_autogptq_reference_loop(bits: int, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    expected = torch.from_numpy(autogptq_pack_rows(codes.numpy(), bits))
    packed = pack_int32(codes, bits, dim=0)
    assert packed.dtype == torch.int32
    assert torch.equal(packed, expected)


def test_three_bit_word_crossing_by_hand() -> None:
    # element 10 = 0b111 straddles words 0/1 (2 low bits at 30-31), element 21 = 0b101
    # straddles words 1/2 (low bit at 31, high 2 bits at 0-1)
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10], codes[0, 21], codes[0, 0], codes[0, 31] = 0b111, 0b101, 0b011, 0b110
    words = pack_int32(codes, 3, dim=1)[0].to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30 | 0b011, 1 | 1 << 31, 0b10 | 0b110 << 29]


def test_four_bit_nibble_order() -> None:
    codes = torch.arange(8).reshape(1, 8)
    assert int(pack_int32(codes, 4)[0, 0]) == 0x76543210


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("length", [1, 31, 32, 33, 70, 128])
def test_round_trip_exact(bits: int, dim: int, length: int) -> None:
    gen = torch.Generator().manual_seed(length * 10 + bits)
    shape = (length, 3) if dim == 0 else (3, length)
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int32)
    codes[0, 0] = 2**bits - 1  # the top code sets the sign bit of some words
    packed = pack_int32(codes, bits, dim=dim)
    assert packed.shape[dim] == packed_length(length, bits)
    assert torch.equal(unpack_int32(packed, bits, length, dim=dim), codes)


@pytest.mark.parametrize("bits", BITS)
def test_matches_compressed_tensors_packer(bits: int) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (6, 70), generator=gen)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors' signed codes
    assert torch.equal(pack_int32(codes, bits, dim=1), helpers.pack_to_int32(signed, bits))
    assert torch.equal(
        pack_int32(codes, bits, dim=0), helpers.pack_to_int32(signed, bits, packed_dim=0)
    )


def test_rejects_out_of_range_codes_naming_tensor() -> None:
    with pytest.raises(EpmqError, match=r"layer\.codes.*\[0, 15\]"):
        pack_int32(torch.tensor([[0, 16]]), 4, name="layer.codes")
    with pytest.raises(EpmqError, match="5-bit"):
        pack_int32(torch.tensor([[0, 1]]), 5)
    with pytest.raises(EpmqError, match="integer"):
        pack_int32(torch.tensor([[0.0, 1.0]]), 4)


def test_unpack_rejects_wrong_length() -> None:
    packed = pack_int32(torch.zeros(2, 64, dtype=torch.int32), 4)
    with pytest.raises(EpmqError, match="cannot hold exactly"):
        unpack_int32(packed, 4, 100)
