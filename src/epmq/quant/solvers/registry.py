"""The registry of quantization solvers, by name: one file per solver under this package.

A solver is a plain function over one linear layer::

    @register_solver("gptq", params=GPTQ_PARAMS, grid="required", statistics="hessian")
    def gptq_solver(problem, grid, params):
        return solution_of(gptq(problem.merged, problem.sums.s, grid, **gptq_settings(params)))

``problem`` is a :class:`LayerProblem` (the merged weight, the folded statistics, the experts'
weights when the solver reads them), ``grid`` the quantization grid (None for a solver that
does not round, or where rounding is optional), ``params`` the solver's declared parameters,
validated and filled with defaults. The function returns a :class:`LayerSolution`.

What the calibration engine must collect for a solver is declared with it, and the engine reads
only these declarations (it never compares names):

- ``grid``: ``required`` (it rounds), ``optional`` (without a grid it writes an unrounded
  target, a merge in its own right) or ``none`` (a merge, never rounds);
- ``statistics``: ``hessian`` (``S = Σ_i w_i H_i``), ``target`` (also
  ``B = Σ_i w_i W_i H_i``; ``expert_targets(params)`` says whether ``W_i`` is each task's
  expert, with ``W_i C_i`` when the expert activation stream runs, or the merged weight
  ``W_m`` (targets ``W_m X_i``)) or ``grams`` (the per-task Grams kept);
- ``reads_experts``: its solve needs the experts' weights of the layer;
- ``uses_inputs``: False when the inputs only feed the reported loss (RTN): such a solver runs
  without calibration data and needs one pass per block;
- ``gram_inputs``: ``expert`` when, with the expert activation stream, its Grams are taken of
  the experts' own inputs (RegMean's), else ``model``;
- ``x_sources``: the X-sources it supports, its default first (E-PMQ's is ``expert``);
- ``input_scales``: a search, run once per group of linears reading one input that the model's
  adapter can rescale (``BlockAdapter.input_producers``: a norm, or the rows of the linear
  before), returning a per-input-channel ``s`` (or None). Each linear of the group is then
  solved with ``problem.input_scale = s`` and must return a weight for the inputs ``x / s``
  (``≈ W · diag(s)``, on its grid); the engine divides the producer's output channels by ``s``,
  so the model computes ``Q · (x / s)`` and exports like any other solver (AWQ);
- ``fits_norms``: whether, with these parameters, the engine refits every norm's affine toward
  the experts' norm outputs before the linears reading it (``epmq.calib.norms``; the run then
  needs the experts);
- ``target_stream``: ``experts`` (each task's target is its expert) or ``merge`` (the
  full-precision merged model is every task's "expert": the engine snapshots each block before
  solving it and runs the merged model's own activation stream beside the quantized one, so
  ``B = Σ_i w_i W_m C_i`` with ``C_i = X_i^fp X_iᵀ / n_i``; the fp-target GPTQ baseline);
- ``fits_bias(params)``: whether, after each linear with a bias is solved, the engine sets the
  bias that best reproduces the targets' outputs on the calibration data (quant/bias.py: the
  experts' ``W_i x̃ + b_i`` for expert targets, else the merged ``W_m x + b_m``); the engine
  then also collects each task's mean inputs, in the same pass as the Grams;
- ``baseline``: the solver this one improves on with the same grid and Hessian (E-PMQ: GPTQ);
  reports split the gain over it into a better target and less rounding loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from epmq.errors import EpmqError
from epmq.params import Declared, Param
from epmq.quant.grid import QuantGrid
from epmq.quant.result import QuantResult
from epmq.quant.target import TargetSums

X_SOURCES = ("quantized", "merged", "expert")
GridNeed = Literal["required", "optional", "none"]
StatisticsNeed = Literal["hessian", "target", "grams"]
TargetStream = Literal["experts", "merge"]


@dataclass
class LayerProblem:
    """One linear layer: merged weight, folded statistics, per-task Grams, experts' weights.

    ``sums`` and ``grams`` are None without calibration data (RTN); ``grams`` (and ``crosses``
    with the expert stream) are set for ``grams`` solvers and when the engine kept them.
    """

    name: str
    merged: Tensor
    grams: list[Tensor] | None
    crosses: list[Tensor] | None
    experts: list[Tensor] | None
    #: ``S`` and ``B`` folded from the statistics (calib/statistics.py)
    sums: TargetSums | None = None
    #: ``s`` from the solver's ``input_scales`` search: the layer will read ``x / s``
    input_scale: Tensor | None = None
    #: bias correction (``fits_bias``): the merged bias, the experts' biases (None: no
    #: experts), the per-task mean inputs ``μ_i`` and the targets' ``μ̃_i`` (None: ``μ_i``)
    merged_bias: Tensor | None = None
    expert_biases: list[Tensor] | None = None
    means: list[Tensor] | None = None
    target_means: list[Tensor] | None = None


@dataclass
class LayerSolution:
    """The weight to write back, the quantization result (None for merges), the figures."""

    weight: Tensor
    result: QuantResult | None
    proxy_loss: float
    damping: float
    damping_retries: int
    seconds: float
    #: the corrected bias (bias correction), None to keep the layer's
    bias: Tensor | None = None


SolveFn = Callable[[LayerProblem, QuantGrid | None, Mapping[str, Any]], LayerSolution]
ParamsTest = Callable[[Mapping[str, Any]], bool]  # a declaration that depends on the params
ExpertTargets = ParamsTest
ScaleSearch = Callable[[Sequence[LayerProblem], QuantGrid | None, Mapping[str, Any]], Tensor | None]


def _always(params: Mapping[str, Any]) -> bool:
    return True


def _never(params: Mapping[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class Solver(Declared):
    """A registered solver: its function, parameters and what it needs (module docs)."""

    fn: SolveFn
    label: str = ""
    grid: GridNeed = "required"
    statistics: StatisticsNeed = "hessian"
    reads_experts: bool = False
    uses_inputs: bool = True
    gram_inputs: Literal["model", "expert"] = "model"
    x_sources: tuple[str, ...] = X_SOURCES
    expert_targets: ExpertTargets = _always
    input_scales: ScaleSearch | None = None
    baseline: str | None = None
    fits_norms: ParamsTest = _never
    fits_bias: ParamsTest = _never
    target_stream: TargetStream = "experts"

    @property
    def studied(self) -> bool:
        """Whether the solver fits expert-guided targets (``target`` statistics, the experts'
        stream): the X-source study and the α sweep of an experiment are about such solvers."""
        return self.statistics == "target" and self.target_stream == "experts"

    def second_stream(self, x_source: str) -> bool:
        """Whether a second activation stream runs beside the calibrated one: the experts'
        (``x_source="expert"``) or the full-precision merge's (``target_stream="merge"``)."""
        return x_source == "expert" or self.target_stream == "merge"

    def needs_experts(self, params: Mapping[str, Any], x_source: str) -> bool:
        """Whether a run with ``params`` and ``x_source`` reads the experts: its solve does,
        their activation stream runs, or the norms are refitted toward theirs."""
        return self.reads_experts or x_source == "expert" or self.fits_norms(params)

    @property
    def default_x_source(self) -> str:
        """Where its layer inputs come from unless the user says otherwise."""
        return self.x_sources[0]

    @property
    def rounds(self) -> bool:
        """Whether the solver can round (its results are quantized linears)."""
        return self.grid != "none"

    def check_grid(self, grid: QuantGrid | None) -> None:
        """Raise :class:`EpmqError` when ``grid`` does not fit the solver's declaration."""
        if grid is None and self.grid == "required":
            raise EpmqError(f"method {self.name!r} needs a quantization grid")
        if grid is not None and self.grid == "none":
            raise EpmqError(f"method {self.name!r} does not round: give no grid")

    def check_x_source(self, x_source: str) -> None:
        if x_source not in X_SOURCES:
            raise EpmqError(f"x_source must be one of {', '.join(X_SOURCES)}, got {x_source!r}")
        if x_source not in self.x_sources:
            raise EpmqError(
                f"method {self.name!r} supports x_source {', '.join(self.x_sources)}, "
                f"not {x_source!r}"
            )

    def weights_for_target(
        self, params: Mapping[str, Any], experts: Sequence[Tensor] | None, merged: Tensor
    ) -> list[Tensor] | None:
        """What each task's B term is folded with: the experts' weights, or ``W_m`` repeated
        (merged targets); None without ``target`` statistics (S is all the solver needs)."""
        if self.statistics != "target":
            return None
        if experts is None:
            raise EpmqError(f"method {self.name!r} needs the experts' weights")
        return list(experts) if self.expert_targets(params) else [merged] * len(experts)

    def targets_are_experts(self, params: Mapping[str, Any]) -> bool:
        """Whether each task's target is its expert's outputs (else the merged model's)."""
        return self.statistics == "target" and self.expert_targets(params)

    def cross_terms(self, params: Mapping[str, Any]) -> bool:
        """Whether B takes the expert stream's cross terms ``C_i`` (expert targets only)."""
        return self.targets_are_experts(params)


_REGISTRY: dict[str, Solver] = {}


def register_solver(
    name: str,
    *,
    label: str = "",
    params: Sequence[Param] = (),
    summary: str = "",
    x_sources: Sequence[str] = X_SOURCES,
    **declarations: Any,
) -> Callable[[SolveFn], SolveFn]:
    """Decorator: register ``fn`` as the solver ``name`` with its declarations: ``label``
    (default the name in capitals), ``params``, ``summary`` (default the first line of its
    docstring), ``x_sources`` (its default first) and any other :class:`Solver` field
    (``grid``, ``statistics``, ``reads_experts``, ... : module docs)."""

    def decorate(fn: SolveFn) -> SolveFn:
        if name in _REGISTRY:
            raise ValueError(f"solver {name!r} registered twice")
        _REGISTRY[name] = Solver(
            name=name,
            params=tuple(params),
            summary=summary or (fn.__doc__ or "").strip().splitlines()[0],
            fn=fn,
            label=label or name.upper(),
            x_sources=tuple(x_sources),
            **declarations,
        )
        return fn

    return decorate


def _load_builtin() -> None:
    import epmq.quant.solvers.builtin  # noqa: F401  (registers the built-in solvers)


def get_solver(name: str | Solver) -> Solver:
    """The solver registered as ``name``; unknown names raise :class:`EpmqError`."""
    if isinstance(name, Solver):
        return name
    _load_builtin()
    if name not in _REGISTRY:
        raise EpmqError(f"unknown method {name!r}; valid methods: {', '.join(list_solvers())}")
    return _REGISTRY[name]


def list_solvers(*, rounding: bool | None = None) -> list[str]:
    """Names of the registered solvers, sorted (``rounding=True``: only those that round)."""
    _load_builtin()
    return sorted(n for n, s in _REGISTRY.items() if rounding is None or s.rounds == rounding)


def solver_rank(name: str) -> int:
    """Where ``name`` was registered among the solvers (after all of them if it was not)."""
    _load_builtin()
    names = list(_REGISTRY)
    return names.index(name) if name in names else len(names)


def solver_label(name: str) -> str:
    """A solver's display name (``E-PMQ``); an unregistered name (an old results file) as is."""
    _load_builtin()
    solver = _REGISTRY.get(name)
    return name if solver is None else solver.label


def solution_of(result: QuantResult) -> LayerSolution:
    """The solution of a rounding solver from its :class:`QuantResult`."""
    return LayerSolution(
        result.weight,
        result,
        float(result.proxy_loss),
        float(result.damping),
        int(result.damping_retries),
        float(result.seconds),
    )
