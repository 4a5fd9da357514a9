"""The ``norm_correction`` parameter, shared by the solvers that can refit norms (GPTQ,
E-PMQ), and their ``fits_norms`` declaration (the engine's fit: ``epmq.calib.norms``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epmq.params import Param

NORM_CORRECTION = Param(
    "norm_correction", bool, False,
    "refit every LayerNorm / RMSNorm affine toward the experts' norm outputs (needs experts)",
    label=lambda v: "norm-corrected" if v else None,
    slug=lambda v: "norms" if v else None,
)  # fmt: skip


def fits_norms(params: Mapping[str, Any]) -> bool:
    """Whether a run with these (resolved) parameters refits the norms."""
    return bool(params.get(NORM_CORRECTION.name, False))
