"""Magnitude thresholds for top-k trimming ("keep the density·n largest |τ| entries").

The rule, for n entries and density d: keep count k = round(d·n); the threshold t is the k-th
largest |τ| (t = +inf when k = 0, so nothing is kept); every entry with |τ| >= t is kept, so
entries tied with the k-th value are all kept.

Global scope (one threshold per task vector over all merged parameters, as the TIES paper and
FusionBench do) uses an exact two-pass radix selection that never holds more than one tensor:
non-negative float32 values order like their bit patterns read as integers, so pass 1 counts
the top 16 bits of |τ| in a 32,768-bin histogram, which locates the bin holding the k-th
largest value, and pass 2 counts the low 16 bits of the entries in that bin, which gives the
exact value. The result equals ``torch.kthvalue`` over the concatenation of all tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

_HI_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit is 0)
_LO_BINS = 1 << 16
_CHUNK = 1 << 22  # entries per histogram update: bounds the temporaries to ~16 MiB each


def keep_count(density: float, numel: int) -> int:
    """How many entries top-k trimming keeps: round(density · numel)."""
    return min(numel, max(0, round(density * numel)))


def tensor_threshold(tau: torch.Tensor, density: float) -> float:
    """Threshold over one tensor (``topk_scope="tensor"``, as mergekit does)."""
    flat = tau.detach().reshape(-1).abs().float()
    k = keep_count(density, flat.numel())
    if k == 0:
        return math.inf
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def _bit_chunks(tau: torch.Tensor) -> Iterator[torch.Tensor]:
    """|tau| as int32 bit patterns, in chunks (monotone in the value for non-negative floats)."""
    for chunk in tau.detach().reshape(-1).split(_CHUNK):
        yield chunk.float().abs().view(torch.int32)


def global_thresholds(
    names: Sequence[str],
    task_vectors: Callable[[str], Iterable[torch.Tensor]],
    num_tasks: int,
    density: float,
) -> tuple[float, ...]:
    """Exact per-task thresholds over all ``names``.

    ``task_vectors(name)`` yields the K task vectors of one parameter (it is called twice per
    name: one call per pass), so only one parameter's tensors are held at a time.
    """
    hi = torch.zeros(num_tasks, _HI_BINS, dtype=torch.long)
    total = 0
    for name in names:
        for i, tau in enumerate(task_vectors(name)):
            for bits in _bit_chunks(tau):
                hi[i] += torch.bincount(bits >> 16, minlength=_HI_BINS)
            if i == 0:
                total += tau.numel()
    k = keep_count(density, total)
    if k == 0:
        return tuple(math.inf for _ in range(num_tasks))
    # per task: the bin of the k-th largest value and its rank inside that bin
    from_top = hi.flip(1).cumsum(1)
    bins, ranks = [], []
    for i in range(num_tasks):
        j = int(torch.searchsorted(from_top[i], torch.tensor(k)))
        above = int(from_top[i, j - 1]) if j > 0 else 0
        bins.append(_HI_BINS - 1 - j)
        ranks.append(k - above)
    lo = torch.zeros(num_tasks, _LO_BINS, dtype=torch.long)
    for name in names:
        for i, tau in enumerate(task_vectors(name)):
            for bits in _bit_chunks(tau):
                inside = bits[(bits >> 16) == bins[i]]
                lo[i] += torch.bincount(inside & 0xFFFF, minlength=_LO_BINS)
    thresholds = []
    for i in range(num_tasks):
        from_top_lo = lo[i].flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top_lo, torch.tensor(ranks[i])))
        value_bits = (bins[i] << 16) | (_LO_BINS - 1 - j)
        as_float = torch.tensor([value_bits], dtype=torch.int32).view(torch.float32)
        thresholds.append(float(as_float))
    return tuple(thresholds)
