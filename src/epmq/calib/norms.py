"""Norm correction: refit each LayerNorm / RMSNorm affine of a block toward the experts.

Rounding touches only the linears' weights; a norm's affine ``(γ, β)`` keeps its merged value
although the calibration data says what the experts would have it be. For each norm the
family's adapter names (:meth:`~epmq.models.adapter.BlockAdapter.norms`) and every channel c,
with ``x̂`` the norm's normalised input (before its affine) on task i's stream being calibrated
(the model as quantized so far) and ``y`` the expert's own norm output, this fits

    min_{γ_c, β_c}  Σ_i w_i · mean_t (γ_c x̂_{t,c} + β_c − y_{t,c})²

``y`` is the expert's norm output on the expert's own activation stream with
``x_source="expert"``, else the expert's affine on the same ``x̂``: ``γ_i x̂ + β_i``. With
``c_i = w_i / n_i`` (``n_i`` task i's tokens) and five per-channel sums accumulated in float64

    A = Σ_i w_i,  Sx = Σ_i c_i Σ_t x̂,  Sxx = Σ_i c_i Σ_t x̂²,  Sy = Σ_i c_i Σ_t y,
    Sxy = Σ_i c_i Σ_t x̂ y

the normal equations ``[Sxx Sx; Sx A] [γ; β] = [Sxy; Sy]`` give the closed form

    γ = (A Sxy − Sx Sy) / (A Sxx − Sx²),   β = (Sy − γ Sx) / A

and for RMSNorm (no β) ``γ = Sxy / Sxx``. A channel whose ``x̂`` is constant over the
calibration tokens (a vanishing determinant) keeps its γ and refits β alone.

When (:func:`norm_slots`): a norm is fitted after the linears that produce its input are
solved and before the linears that read it, i.e. after the group holding the linear the
adapter names as its producer (None: before the block's first group). So pre-norm blocks
(Llama, CLIP, T5) fit ``input_layernorm`` first and the post-attention norm after the
attention output projection; post-norm BERT fits ``attention.output.LayerNorm`` after
``attention.output.dense`` (before ``intermediate.dense`` reads it) and ``output.LayerNorm``
(the block's output, read by the next block) after ``output.dense``, before the block's
inputs are propagated. Without true-sequential groups a producer-less norm is fitted before
the block's one pass and the others after its solve; with ``x_source="merged"`` every norm is
fitted before the block's one pass (the merged stream then runs through the corrected norms,
and a resumed run loads them before replaying that stream: :func:`norm_tensors`).

Each fit is one extra pass over the block's calibration calls, stopped at the norm. The fitted
tensors are written to the block and into the block's outcome (``<norm>`` for γ,
``<norm>.bias`` for β), so checkpoints replay them and exports carry them like any parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from epmq.calib.capture import BlockCall, Streams
from epmq.calib.expert_weights import ExpertWeights
from epmq.calib.reuse import FinalOutputs
from epmq.calib.statistics import flatten_tokens
from epmq.models.adapter import StopForward

logger = logging.getLogger("epmq.calib")

#: (norm, the linear producing its input or None), relative to a block, in forward order
NormSite = tuple[str, str | None]


def affine_of(norm: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The norm's ``(γ, β)`` parameters (β None for RMSNorm)."""
    bias = getattr(norm, "bias", None)
    return norm.weight, bias if isinstance(bias, Tensor) else None


def normalised(norm: nn.Module, x: Tensor) -> Tensor:
    """``x̂``: the norm applied to ``x`` with ``γ = 1`` (and ``β = 0``), computed as the
    module computes it (eps, float32 upcast, output dtype) whatever its class."""
    gamma, beta = affine_of(norm)
    params = {"weight": torch.ones_like(gamma)}
    if beta is not None:
        params["bias"] = torch.zeros_like(beta)
    return functional_call(norm, params, (x,))


@dataclass
class NormSums:
    """The five per-channel sums of one norm, folded over tasks (module docstring)."""

    channels: int
    device: torch.device | None = None
    weight: float = 0.0  # A = Σ_i w_i
    sx: Tensor = field(init=False)
    sxx: Tensor = field(init=False)
    sy: Tensor = field(init=False)
    sxy: Tensor = field(init=False)
    syy: Tensor = field(init=False)  # only for the reported error

    def __post_init__(self) -> None:
        for key in ("sx", "sxx", "sy", "sxy", "syy"):
            setattr(self, key, self._zeros())

    def _zeros(self) -> Tensor:
        return torch.zeros(self.channels, dtype=torch.float64, device=self.device)

    def add_task(self, raw: Tensor, task_weight: float) -> None:
        """Fold one task's raw sums ``[n, Σx̂, Σx̂², Σy, Σx̂y, Σy²]`` (a ``[6, C]`` tensor,
        ``n`` repeated over channels) with ``c_i = w_i / n_i``."""
        n = float(raw[0, 0])
        if n == 0:
            return
        c = task_weight / n
        self.weight += task_weight
        for row, key in enumerate(("sx", "sxx", "sy", "sxy", "syy"), start=1):
            getattr(self, key).add_(raw[row], alpha=c)

    def fit(self, gamma: Tensor, beta: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The closed-form ``(γ, β)`` (float64); ``gamma`` is kept where ``x̂`` is constant."""
        g = gamma.detach().to(self.sx)
        if self.weight <= 0:
            return g, None if beta is None else beta.detach().to(self.sx)
        if beta is None:
            ok = self.sxx > 1e-12 * self.sxx.max().clamp_min(1e-300)
            return torch.where(ok, self.sxy / self.sxx.where(ok, 1.0), g), None
        a = self.weight
        det = a * self.sxx - self.sx**2
        ok = det > 1e-9 * a * self.sxx
        fitted = (a * self.sxy - self.sx * self.sy) / det.where(ok, 1.0)
        g = torch.where(ok, fitted, g)
        return g, (self.sy - g * self.sx) / a

    def error(self, gamma: Tensor, beta: Tensor | None) -> float:
        """``Σ_i w_i mean_t ‖γ x̂ + β − y‖²`` (summed over channels) at ``(γ, β)``."""
        g = gamma.detach().to(self.sx)
        value = g**2 * self.sxx - 2 * g * self.sxy + self.syy
        if beta is not None:
            b = beta.detach().to(self.sx)
            value = value + 2 * g * b * self.sx + b**2 * self.weight - 2 * b * self.sy
        return float(value.sum())


def raw_sums(xhat: Tensor, y: Tensor) -> Tensor:
    """``[6, C]``: token count, Σx̂, Σx̂², Σy, Σx̂y, Σy² of ``[tokens, C]`` rows (float64)."""
    x, t = xhat.double(), y.double()
    count = torch.full_like(x[0], float(x.shape[0])) if x.shape[0] else x.new_zeros(x.shape[1])
    return torch.stack([count, x.sum(0), (x * x).sum(0), t.sum(0), (x * t).sum(0), (t * t).sum(0)])


class NormInput:
    """Context manager recording one norm's input (and output) in a block's forward, then
    stopping the forward (:class:`StopForward`)."""

    def __init__(self, block: nn.Module, name: str) -> None:
        self.norm = block.get_submodule(name)
        self.input: Tensor | None = None
        self.output: Tensor | None = None
        self._handle: Any = None
        self._quiet = False  # while computing x̂ with the same module

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._quiet:
            return
        self.input, self.output = args[0].detach(), output.detach()
        raise StopForward

    def run(self, call: BlockCall, block: nn.Module) -> tuple[Tensor, Tensor]:
        """The norm's ``[tokens, C]`` normalised input and output on ``call`` (masked)."""
        self.input = self.output = None
        call.run(block)
        if self.input is None or self.output is None:
            raise RuntimeError("the block's forward never reached the norm")
        self._quiet = True
        try:
            xhat = normalised(self.norm, self.input)
        finally:
            self._quiet = False
        return flatten_tokens(xhat, call.mask), flatten_tokens(self.output, call.mask)

    def __enter__(self) -> NormInput:
        self._handle = self.norm.register_forward_hook(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.remove()


def norm_slots(
    sites: Sequence[NormSite], plan: Sequence[Sequence[str]], *, upfront: bool = False
) -> list[list[str]]:
    """``len(plan) + 1`` lists: the norms to fit before group k (the last: after every
    group, before propagation). A norm is fitted after the group holding its producer
    (module docstring); ``upfront`` puts every norm before the first group."""
    slots: list[list[str]] = [[] for _ in range(len(plan) + 1)]
    where = {name: k + 1 for k, group in enumerate(plan) for name in group}
    for norm, producer in sites:
        slots[0 if upfront or producer is None else where.get(producer, 0)].append(norm)
    return slots


def norm_tensors(weights: Mapping[str, Tensor], prefix: str, sites: Sequence[NormSite]):
    """The entries of a block's solved ``weights`` that are its norms' (γ and β)."""
    names = {f"{prefix}.{norm}" for norm, _ in sites}
    names |= {f"{name}.bias" for name in names}
    return {key: value for key, value in weights.items() if key in names}


@dataclass
class BlockNorms:
    """Fits a block's norms (one pass each) and writes them to the block and ``weights``."""

    block: nn.Module
    prefix: str
    tasks: list[str]
    experts: list[ExpertWeights]
    task_weights: Sequence[float] | None = None
    distributed: bool = False

    @torch.no_grad()
    def fit(
        self,
        norms: Sequence[str],
        calls: Streams,
        twins: Sequence[nn.Module] | None,
        expert_calls: Streams | None,
        weights: dict[str, Tensor],
        reuse: FinalOutputs | None = None,
    ) -> None:
        """Fit ``norms`` in order, each on the block as it stands (earlier ones corrected).
        With ``twins`` (the experts' blocks on ``expert_calls``) the targets are their norm
        outputs, else each expert's affine on the same ``x̂``."""
        for name in norms:
            norm = self.block.get_submodule(name)
            gamma, beta = affine_of(norm)
            sums = NormSums(int(gamma.numel()), gamma.device)
            for t, task in enumerate(self.tasks):
                raw = self._task_sums(name, t, task, calls, twins, expert_calls)
                if self.distributed:
                    dist.all_reduce(raw)
                w = 1.0 if self.task_weights is None else float(self.task_weights[t])
                sums.add_task(raw, w)
            new_gamma, new_beta = sums.fit(gamma, beta)
            before = sums.error(gamma, beta)
            gamma.data.copy_(new_gamma.to(gamma.dtype))
            full = f"{self.prefix}.{name}"
            weights[full] = gamma.detach().clone()
            if beta is not None and new_beta is not None:
                beta.data.copy_(new_beta.to(beta.dtype))
                weights[f"{full}.bias"] = beta.detach().clone()
            logger.info("%-48s norm    error %.4g -> %.4g", full, before, sums.error(gamma, beta))
            if reuse is not None:
                reuse.forget(name)

    def _task_sums(
        self,
        name: str,
        t: int,
        task: str,
        calls: Streams,
        twins: Sequence[nn.Module] | None,
        expert_calls: Streams | None,
    ) -> Tensor:
        """Task ``t``'s raw sums (:func:`raw_sums`) of norm ``name`` over its calls."""
        norm = self.block.get_submodule(name)
        gamma, beta = affine_of(norm)
        total = torch.zeros(6, int(gamma.numel()), dtype=torch.float64, device=gamma.device)
        own = NormInput(self.block, name)
        if twins is not None and expert_calls is not None:
            theirs = NormInput(twins[t], name)
            with own, theirs:
                for call, expert_call in zip(calls[task], expert_calls[task], strict=True):
                    xhat, _ = own.run(call, self.block)
                    _, y = theirs.run(expert_call, twins[t])
                    total += raw_sums(xhat, y)
            return total
        g_i = self.experts[t].tensor(f"{self.prefix}.{name}.weight", like=gamma.detach())
        b_i = None
        if beta is not None:
            b_i = self.experts[t].tensor(f"{self.prefix}.{name}.bias", like=beta.detach())
        with own:
            for call in calls[task]:
                xhat, _ = own.run(call, self.block)
                y = xhat * g_i if b_i is None else torch.addcmul(b_i, xhat, g_i)
                total += raw_sums(xhat, y)
        return total
