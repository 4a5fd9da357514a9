"""Bit packing of integer codes into int32 words: the layout GPTQ and compressed-tensors share.

Both formats pack *densely and little-endian*: along the packed dimension, element ``i`` of a
run of codes occupies global bits ``[i*b, (i+1)*b)`` of the little-endian bit string formed by
consecutive int32 words (word ``w`` holds global bits ``[32w, 32w+32)``, its bit 0 first).

- 2, 4 and 8 bits divide 32, so no element straddles a word::

      4 bits: word w = e[8w] | e[8w+1] << 4 | ... | e[8w+7] << 28
      2 bits: word w = e[16w] | e[16w+1] << 2 | ... | e[16w+15] << 30
      8 bits: word w = e[4w] | e[4w+1] << 8 | e[4w+2] << 16 | e[4w+3] << 24

- 3 bits: 32 elements fill exactly 3 words (96 bits) and two elements cross a boundary,
  exactly as AutoGPTQ/GPTQModel pack ``qweight``::

      word 0: e0..e9 at bits 0,3,..,27 ; low 2 bits of e10 at bits 30-31
      word 1: high bit of e10 at bit 0 ; e11..e20 at bits 1,4,..,28 ; low bit of e21 at bit 31
      word 2: high 2 bits of e21 at bits 0-1 ; e22..e31 at bits 2,5,..,29

A trailing partial run is padded with zero codes, so ``n`` codes take ``ceil(n*b/32)`` words.
Words are stored as int32 (two's complement), i.e. bit 31 set means a negative int32.

The packed values are *unsigned* codes in ``[0, 2**b - 1]``; signed conventions (the
compressed-tensors ``q + 2**(b-1)`` offset, GPTQ v1 "zero - 1") are applied by the format
modules before packing, not here.
"""

from __future__ import annotations

import math

import torch

from epmq.errors import EpmqError

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits (dense packing)."""
    return math.ceil(n * bits / 32)


def _check_bits(bits: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise EpmqError(f"{what}: {bits}-bit packing is not supported; use one of {SUPPORTED_BITS}")


def pack_int32(
    codes: torch.Tensor, bits: int, dim: int = -1, *, name: str = "codes"
) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along ``dim`` of a 2-D tensor into int32 words.

    ``codes`` holds integers in ``[0, 2**bits - 1]`` (any integer dtype). The result has
    ``ceil(n*bits/32)`` words along ``dim`` (``n`` = size of ``dim``) and the other dimension
    unchanged. Raises :class:`EpmqError` naming ``name`` for codes out of range.
    """
    _check_bits(bits, name)
    if codes.ndim != 2:
        raise EpmqError(f"{name}: expected a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise EpmqError(f"{name}: codes must be an integer tensor, got {codes.dtype}")
    maxq = (1 << bits) - 1
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > maxq):
        raise EpmqError(
            f"{name}: codes must lie in [0, {maxq}] for {bits} bits, "
            f"found [{int(codes.min())}, {int(codes.max())}]"
        )
    values = codes.to(torch.int64)
    if dim in (0, -2):
        values = values.t()
    rows, n = values.shape
    # pad to whole runs of 32 elements (= exactly `bits` words each), zero codes in the padding
    runs = math.ceil(n / 32)
    values = torch.nn.functional.pad(values, (0, runs * 32 - n)).reshape(rows, runs, 32)
    start = torch.arange(32, dtype=torch.int64) * bits  # global bit offset of each element
    words = torch.zeros(rows, runs, bits, dtype=torch.int64)
    # low part: the element's bits that fit in its first word
    words.scatter_add_(2, (start // 32).expand(rows, runs, 32), values << (start % 32))
    # high part: the bits that spill into the next word (only for 3 bits: e10 and e21)
    spill = (start % 32) + bits - 32
    crossing = spill > 0
    if bool(crossing.any()):
        high = values[..., crossing] >> (bits - spill[crossing])
        index = (start[crossing] // 32 + 1).expand(rows, runs, int(crossing.sum()))
        words.scatter_add_(2, index, high)
    words = words.reshape(rows, runs * bits)[:, : packed_length(n, bits)]
    # keep the low 32 bits and reinterpret them as signed int32
    packed = (words & 0xFFFFFFFF).to(torch.int64)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    if dim in (0, -2):
        packed = packed.t()
    return packed.contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: unpack ``n`` codes along ``dim``; returns int32 codes."""
    _check_bits(bits, "packed")
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise EpmqError(
            f"packed: expected a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned view of each word
    if dim in (0, -2):
        words = words.t()
    rows, n_words = words.shape
    if n_words != packed_length(n, bits):
        raise EpmqError(
            f"packed: {n_words} words along dim {dim} cannot hold exactly {n} {bits}-bit codes "
            f"(expected {packed_length(n, bits)})"
        )
    runs = math.ceil(n / 32)
    words = torch.nn.functional.pad(words, (0, runs * bits - n_words)).reshape(rows, runs, bits)
    start = torch.arange(32, dtype=torch.int64) * bits
    mask = (1 << bits) - 1
    low = words[..., start // 32] >> (start % 32)
    spill = (start % 32) + bits - 32
    nxt = torch.clamp(start // 32 + 1, max=bits - 1)
    high = torch.where(spill > 0, words[..., nxt] << (bits - spill.clamp(min=0)), 0)
    codes = ((low | high) & mask).reshape(rows, runs * 32)[:, :n].to(torch.int32)
    if dim in (0, -2):
        codes = codes.t()
    return codes.contiguous()
