"""epmq.calib: the layer-wise calibration engine (capture → calibrate → solve → propagate).

:func:`quantize_model` walks a model block by block with a family adapter
(:mod:`epmq.models`), accumulates per-task Grams of every linear, solves each linear with a
registered solver (:mod:`epmq.quant.solvers`: RTN, GPTQ, E-PMQ, the RegMean merge, ...) and
returns a :class:`CalibrationRun`.
Expert weights are read one block at a time through :class:`ExpertWeights` sources.
"""

from epmq.calib.engine import CalibrationRun, EngineOptions, check_finite_model, quantize_model
from epmq.calib.expert_weights import (
    ExpertWeights,
    SafetensorsExpert,
    StateDictExpert,
    as_expert,
)
from epmq.calib.records import LayerRecord
from epmq.calib.solve import SolveOptions

__all__ = [
    "CalibrationRun",
    "EngineOptions",
    "ExpertWeights",
    "LayerRecord",
    "SafetensorsExpert",
    "SolveOptions",
    "StateDictExpert",
    "as_expert",
    "check_finite_model",
    "quantize_model",
]
