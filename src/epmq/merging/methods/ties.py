"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

τ_i = W_i − W_0; keep the top ``density`` fraction of each τ_i by magnitude (one threshold per
task over all merged parameters with ``topk_scope="global"``, per tensor with ``"tensor"``;
see :mod:`epmq.merging.topk`), elect the sign of each entry by total mass, combine the agreeing
entries (:mod:`epmq.merging.sign_consensus`), and return W_0 + scale · merged.

Defaults are one consistent pair: FusionBench's (density 0.2, a disjoint *sum*, scale 0.3),
the setting the E-PMQ paper reports; ``merge_func=mean`` (the TIES paper's) wants scale ≈ 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from epmq.merging.registry import Param, TensorContext, register_method
from epmq.merging.sign_consensus import MERGE_FUNCS, disjoint_merge
from epmq.merging.topk import tensor_threshold

TOPK_SCOPES = ("global", "tensor")


def _global_density(params: Mapping[str, Any]) -> float | None:
    return params["density"] if params["topk_scope"] == "global" else None


@register_method(
    "ties",
    params=[
        Param(
            "density",
            float,
            0.2,
            "fraction of each task vector kept, by magnitude",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        Param(
            "merge_func",
            str,
            "sum",
            "sum: FusionBench's setting, with scale 0.3 (the paper's); mean: the TIES paper's "
            "disjoint mean, which wants scale ≈ 1",
            choices=MERGE_FUNCS,
        ),
        Param("scale", float, 0.3, "scaling of the merged task vector"),
        Param(
            "topk_scope",
            str,
            "global",
            "global: one threshold per task over all merged parameters; tensor: per tensor",
            choices=TOPK_SCOPES,
        ),
    ],
    summary="trim task vectors to top-k magnitude, elect signs by mass, disjoint merge",
    global_density=_global_density,
)
def ties(
    base: torch.Tensor,
    experts: torch.Tensor,
    ctx: TensorContext,
    *,
    density: float,
    merge_func: str,
    scale: float,
    topk_scope: str,
) -> torch.Tensor:
    """TIES: trim, elect sign, disjoint merge."""
    taus = experts.sub_(base)
    for i in range(taus.shape[0]):
        if topk_scope == "global":
            if ctx.thresholds is None:
                raise ValueError("ties with topk_scope='global' needs ctx.thresholds")
            threshold = ctx.thresholds[i]
        else:
            threshold = tensor_threshold(taus[i], density)
        taus[i].masked_fill_(taus[i].abs() < threshold, 0.0)
    return disjoint_merge(taus, merge_func).mul_(scale).add_(base)
