"""The ``quantization`` block of an experiment config: quantizers, grids and solver settings.

Validated by pydantic like the rest of the config (:mod:`epmq.experiment.config`): every
quantizer must be a registered rounding solver, every parameter one it declares, the task
weights ``uniform``, ``auto`` or a mapping of non-negative weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from epmq.calib.task_weights import AUTO_ROUNDS, check_task_weights
from epmq.errors import EpmqError

XSource = Literal["quantized", "merged", "expert"]
Target = Literal["expert", "merged"]


class StrictSpec(BaseModel):
    """A config block: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class QuantizationSpec(StrictSpec):
    """The quantizers (registered solvers that round), grids and solver settings, crossed with
    every merge. ``alpha``, ``target``, ``act_order``, ``percdamp`` and ``block_size`` reach
    every solver that declares a parameter of that name; ``params`` sets any declared
    parameter of one solver (``params: {awq: {grid_points: 20}}``)."""

    methods: list[str] = Field(default_factory=lambda: ["rtn", "gptq", "epmq"])
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    bits: list[int] = Field(default_factory=lambda: [4, 3])
    group_sizes: list[int] = Field(default_factory=lambda: [-1])
    symmetric: bool = False
    act_order: bool = False
    true_sequential: bool = True
    percdamp: float = Field(0.01, gt=0)
    block_size: int = Field(128, ge=1)
    alpha: float = Field(0.1, ge=0)
    x_source: XSource | None = None  # None: each solver's default (E-PMQ: expert)
    target: Target = "expert"
    alpha_sweep: list[float] = Field(default_factory=list)
    x_source_study: bool = False
    evaluate_target: bool = True
    #: per-task weights w_i: uniform (1 each), auto (by each expert's distance from the
    #: model, calib/task_weights.py) or {task: w} (a task not named weighs 1); the study
    #: adds the other of uniform / auto beside every studied solver's rows
    task_weights: Literal["uniform", "auto"] | dict[str, float] = "uniform"
    task_weight_rounds: int = Field(AUTO_ROUNDS, ge=0)
    task_weights_study: bool = False

    @field_validator("task_weights", mode="before")
    @classmethod
    def _task_weights_valid(cls, setting: Any) -> Any:
        try:
            check_task_weights(setting)
        except EpmqError as exc:
            raise ValueError(str(exc)) from None
        return setting

    @field_validator("methods")
    @classmethod
    def _registered_solvers(cls, methods: list[str]) -> list[str]:
        from epmq.quant.solvers import list_solvers

        known = list_solvers(rounding=True)
        for method in methods:
            if method not in known:
                raise ValueError(f"unknown quantizer {method!r}; choose from {', '.join(known)}")
        return methods

    @model_validator(mode="after")
    def _solver_params_declared(self) -> QuantizationSpec:
        for method in self.params:
            if method not in self.methods:
                raise ValueError(f"params: {method!r} is not one of the methods {self.methods}")
        for method in self.methods:
            try:
                self.solver_params(method)
            except EpmqError as exc:  # names the solver and the parameter
                raise ValueError(str(exc)) from None
        return self

    def solver_params(self, method: str, **overrides: Any) -> dict[str, Any]:
        """The parameters ``method`` is run with: the shared settings it declares, its own
        ``params`` entry, then ``overrides`` (a study's α or target); validated."""
        from epmq.quant.solvers import get_solver

        solver = get_solver(method)
        shared = {
            "alpha": self.alpha, "target": self.target, "act_order": self.act_order,
            "percdamp": self.percdamp, "block_size": self.block_size,
        }  # fmt: skip
        declared = {p.name for p in solver.params}
        chosen = {k: v for k, v in {**shared, **overrides}.items() if k in declared}
        return solver.resolve({**chosen, **self.params.get(method, {})})

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, bits: list[int]) -> list[int]:
        for b in bits:
            if not 2 <= b <= 8:
                raise ValueError(f"bits must be between 2 and 8, got {b}")
        return bits

    @field_validator("group_sizes")
    @classmethod
    def _group_sizes_valid(cls, sizes: list[int]) -> list[int]:
        for g in sizes:
            if g != -1 and g < 1:
                raise ValueError(f"group size must be -1 (per channel) or positive, got {g}")
        return sizes

    @field_validator("alpha_sweep")
    @classmethod
    def _alphas_non_negative(cls, alphas: list[float]) -> list[float]:
        if any(a < 0 for a in alphas):
            raise ValueError("alpha values must be >= 0")
        return alphas
