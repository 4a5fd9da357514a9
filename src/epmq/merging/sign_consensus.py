"""TIES-style sign election and disjoint merge over stacked task vectors ``(K, ...)``.

Sign election: per entry, the sign of the total mass Σ_i τ_i. Where the total is exactly zero
(in float32) the entry takes the majority sign: the sign of (number of tasks with τ_i > 0) −
(number with τ_i < 0). At an exact tie of both (zero total and as many positive as negative
entries) the elected sign is 0: no task agrees, the merged task vector is 0 there and the base
value is kept. (The TIES reference code falls back to the majority sign of the whole model
instead; a per-entry rule needs no extra pass and behaves the same in streaming mode.)

Disjoint merge: only entries whose sign agrees with the elected one (and are non-zero) are
combined, by ``"mean"`` (the TIES paper's disjoint mean: sum over agreeing tasks divided by
their number) or ``"sum"`` (FusionBench's CLIP setting).
"""

from __future__ import annotations

import torch

MERGE_FUNCS = ("mean", "sum")


def elect_signs(taus: torch.Tensor) -> torch.Tensor:
    """Per-entry elected sign (-1, 0 or +1) of stacked task vectors ``(K, ...)``."""
    sign = taus.sum(0).sign_()
    undecided = sign == 0
    if bool(undecided.any()):
        majority = torch.zeros_like(sign)
        for tau in taus:  # one temporary at a time rather than (K, ...) masks
            majority.add_(torch.sign(tau))
        sign = torch.where(undecided, majority.sign_(), sign)
    return sign


def disjoint_merge(taus: torch.Tensor, merge_func: str) -> torch.Tensor:
    """Elect signs, then combine the agreeing entries; overwrites ``taus`` in place."""
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {MERGE_FUNCS}, got {merge_func!r}")
    sign = elect_signs(taus)
    count = torch.zeros_like(sign)
    for i in range(taus.shape[0]):
        agree = (taus[i] * sign) > 0
        taus[i].mul_(agree)
        count.add_(agree)
    merged = taus.sum(0)
    if merge_func == "mean":
        merged.div_(count.clamp_min_(1))
    return merged
