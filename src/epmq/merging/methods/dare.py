"""DARE (Yu et al. 2024): drop task-vector entries at random, rescale the survivors.

Each entry of τ_i = W_i − W_0 is dropped with probability ``drop_rate`` p and the survivors are
multiplied by 1/(1−p), so E[τ̃_i] = τ_i. Draws come from a generator seeded by (``seed``,
parameter name, task index), so runs are reproducible and the streaming and in-memory paths
agree. The sparse task vectors are then combined by task arithmetic (W_0 + s Σ τ̃_i) or by TIES
sign election and disjoint merge (``combine="ties"``; DARE's random drop replaces TIES'
magnitude trimming, as in mergekit's ``dare_ties``).
"""

from __future__ import annotations

import torch

from epmq.merging.registry import Param, TensorContext, register_method
from epmq.merging.sign_consensus import MERGE_FUNCS, disjoint_merge

COMBINES = ("task_arithmetic", "ties")


@register_method(
    "dare",
    params=[
        Param(
            "drop_rate",
            float,
            0.5,
            "probability p of dropping each task-vector entry",
            low=0.0,
            high=1.0,
            high_open=True,
        ),
        Param("seed", int, 0, "seed of the random drops", low=0),
        Param(
            "combine",
            str,
            "task_arithmetic",
            "how sparse task vectors are combined",
            choices=COMBINES,
        ),
        Param("scale", float, 0.3, "scaling of the combined task vector"),
        Param(
            "merge_func",
            str,
            "sum",
            "with combine=ties: sum (with scale 0.3, as ties) or disjoint mean of agreeing entries",
            choices=MERGE_FUNCS,
        ),
    ],
    summary="randomly drop task-vector entries (rescaled 1/(1-p)), then task arithmetic or TIES",
)
def dare(
    base: torch.Tensor,
    experts: torch.Tensor,
    ctx: TensorContext,
    *,
    drop_rate: float,
    seed: int,
    combine: str,
    scale: float,
    merge_func: str,
) -> torch.Tensor:
    """DARE: drop and rescale, then task arithmetic or TIES."""
    taus = experts.sub_(base)
    if drop_rate > 0:
        for i in range(taus.shape[0]):
            draws = torch.rand(taus[i].shape, generator=ctx.generator(seed, i))
            taus[i].masked_fill_(draws < drop_rate, 0.0).div_(1.0 - drop_rate)
    merged = taus.sum(0) if combine == "task_arithmetic" else disjoint_merge(taus, merge_func)
    return merged.mul_(scale).add_(base)
