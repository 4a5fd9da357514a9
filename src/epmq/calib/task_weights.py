"""Per-task weights ``w_i`` of the calibration objective, given or chosen from the data.

E-PMQ (and every solver folding per-task statistics) minimises ``Σ_i w_i ‖Q X_i − W_i X_i‖²``
over the tasks i. ``quantization.task_weights`` says where the ``w_i`` come from:

- ``uniform``: every ``w_i = 1`` (the paper's objective);
- ``{task: w}``: given by the user (a task not named weighs 1);
- ``auto``: reweighted by how far the model is from each expert on the calibration data, so
  that the tasks the merge serves worst pull the rounding toward their experts.

``auto``, the math. With ``f`` the backbone's output (the hidden states out of the last block
of the last stage, before any final norm or head) and ``f_i`` expert i's, the distance of a
model ``M`` from expert i on task i's calibration batches, over real tokens t only::

    d_i(M) = Σ_t ‖f_M(x_t) − f_i(x_t)‖² / Σ_t ‖f_i(x_t)‖²       (relative output error)

Round 0 reads the full-precision merge ``M_0``: ``w_i = K · d_i(M_0) / Σ_j d_j(M_0)``, so the
weights have mean 1 (sum K, the number of tasks) and ``uniform`` is the case of equal
distances. Each of ``rounds`` further rounds quantizes the merge with the current weights into
``Q``, measures ``d_i(Q)`` and updates multiplicatively::

    w_i ← w_i · d_i(Q) / mean_j d_j(Q),   then   w ← K · w / Σ_j w_j

A task still farther from its expert than the mean gains weight and one closer loses it; the
fixed point is reached when every task is equally far (or its weight is 0). Only calibration
data is read, never test data. When every distance is 0 (the model is every expert) the
weights stay uniform. The experts' outputs are computed once per experiment, loading one
expert at a time (:class:`ExpertOutputs`); each distance is then one forward of the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from epmq.calib.capture import map_tensors
from epmq.calib.distributed import group_ready
from epmq.calib.onload import Onloaded
from epmq.errors import EpmqError
from epmq.models.adapter import Batch, BlockAdapter, StopForward

TaskWeightSetting = Literal["uniform", "auto"] | dict[str, float]
UNIFORM, AUTO = "uniform", "auto"
AUTO_ROUNDS = 1
"""Default fixed-point rounds after round 0 (each costs one more quantization per variant).
On the tiny suite (2 tasks, E-PMQ 4/3/2-bit, task arithmetic and TIES) round 0 alone lowered
the worst task in all six settings (−1 to −7 points: E-PMQ fits the experts, so the merge's
distances misjudge the quantized model's), one round moved it by −1 to +3 (mean +0.9), and a
second round swung the weights back to about uniform (the full multiplicative step
oscillates)."""


def check_task_weights(setting: Any, tasks: Sequence[str] | None = None) -> None:
    """Raise :class:`EpmqError` unless ``setting`` is ``uniform``, ``auto`` or a mapping of
    known tasks (``tasks``; None: not known yet) to finite weights >= 0, not all 0. The message
    names no place: the caller prefixes its own (a config field, a command-line option)."""
    if setting in (UNIFORM, AUTO):
        return
    if not isinstance(setting, Mapping) or not setting:
        raise EpmqError(f"must be uniform, auto or a mapping task: weight, got {setting!r}")
    for task, value in setting.items():
        if tasks is not None and task not in tasks:
            raise EpmqError(f"unknown task {task!r}; the tasks are {', '.join(tasks)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EpmqError(f"the weight of task {task!r} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise EpmqError(f"the weight of task {task!r} must be finite and >= 0, got {value}")
    covered = tasks is None or set(tasks) <= set(setting)  # a task not named weighs 1
    if covered and not any(float(v) for v in setting.values()):
        raise EpmqError("every task weight is 0; give at least one task a weight > 0")


@torch.no_grad()
def backbone_outputs(
    model: nn.Module,
    adapter: BlockAdapter,
    batches: Sequence[Batch],
    device: torch.device | None = None,
) -> list[Tensor]:
    """Per batch, the real-token rows ``[tokens, hidden]`` (float32, on the CPU) of the last
    block's output of the last stage; the forward stops there (the head never runs)."""
    stage = adapter.stages(model)[-1]
    last = adapter.blocks(model, stage)[-1]
    seen: list[Tensor] = []

    def catch(module: nn.Module, args: Any, output: Any) -> None:
        seen.append(adapter.block_output(output).detach())
        raise StopForward

    rows: list[Tensor] = []
    handle = last.register_forward_hook(catch)
    try:
        moved = Onloaded([model], device, write_back=False) if device is not None else None
        with moved or contextlib.nullcontext():
            for batch in batches:
                if device is not None:
                    batch = map_tensors(dict(batch), lambda t: t.to(device))
                seen.clear()
                with contextlib.suppress(StopForward):
                    adapter.run_model(model, batch)
                if not seen:
                    raise EpmqError(f"the forward never reached {stage.blocks_path}'s last block")
                hidden, mask = seen[0], adapter.token_mask(stage, batch)
                if mask is not None and tuple(mask.shape) == tuple(hidden.shape[:-1]):
                    hidden = hidden[mask]
                rows.append(hidden.reshape(-1, hidden.shape[-1]).float().cpu())
    finally:
        handle.remove()
    return rows


@dataclass
class ExpertOutputs:
    """Each expert's backbone outputs on its own task's calibration batches (CPU, float32)."""

    by_task: dict[str, list[Tensor]]

    @classmethod
    def collect(
        cls,
        load_expert: Callable[[str], nn.Module],
        adapter: BlockAdapter,
        calib: Mapping[str, Sequence[Batch]],
        device: torch.device | None = None,
    ) -> ExpertOutputs:
        """Load one expert at a time (``load_expert(task)``), run it on its task's batches."""
        by_task: dict[str, list[Tensor]] = {}
        for task, batches in calib.items():
            expert = load_expert(task).eval()
            by_task[task] = backbone_outputs(expert, adapter, batches, device)
            del expert
        return cls(by_task)


def distances(
    model: nn.Module,
    adapter: BlockAdapter,
    calib: Mapping[str, Sequence[Batch]],
    experts: ExpertOutputs,
    device: torch.device | None = None,
) -> dict[str, float]:
    """``d_i``: the relative output error of ``model`` against expert i on task i's
    calibration batches, ``Σ‖f − f_i‖² / Σ‖f_i‖²`` over real tokens (see the module docs).
    Under ``torch.distributed`` (each rank holding a shard of the batches) both sums are
    summed over the ranks, so every rank gets the same distances, hence the same weights."""
    sums = torch.zeros(len(calib), 2, dtype=torch.float64)  # per task: error, norm
    for t, (task, batches) in enumerate(calib.items()):
        got = backbone_outputs(model, adapter, batches, device)
        want = experts.by_task[task]
        sums[t, 0] = sum(float(((g - w) ** 2).sum()) for g, w in zip(got, want, strict=True))
        sums[t, 1] = sum(float((w**2).sum()) for w in want)
    if group_ready():
        dist.all_reduce(sums)
    return {
        task: float(error / norm) if norm > 0 else 0.0
        for task, (error, norm) in zip(calib, sums.tolist(), strict=True)
    }


def initial_weights(found: Mapping[str, float]) -> dict[str, float]:
    """Round 0: ``w_i = K · d_i / Σ_j d_j`` (uniform when every distance is 0)."""
    total = sum(found.values())
    k = len(found)
    if not total > 0:
        return {task: 1.0 for task in found}
    return {task: k * d / total for task, d in found.items()}


def reweighted(weights: Mapping[str, float], found: Mapping[str, float]) -> dict[str, float]:
    """One fixed-point round: ``w_i ← w_i · d_i / mean d``, renormalised to mean 1 (the
    weights unchanged when the update leaves nothing > 0)."""
    mean = sum(found.values()) / len(found)
    if not mean > 0:
        return dict(weights)
    updated = {task: w * found[task] / mean for task, w in weights.items()}
    total = sum(updated.values())
    if not total > 0:
        return dict(weights)
    return {task: len(updated) * w / total for task, w in updated.items()}


@dataclass(frozen=True)
class ChosenWeights:
    """The weights one model is calibrated with: how they were chosen (``uniform``, ``auto``,
    ``given``), by task, and ``auto``'s distances per round."""

    setting: str
    weights: dict[str, float]
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def values(self) -> list[float] | None:
        """In task order, for :func:`epmq.calib.quantize_model` (None: uniform)."""
        return None if self.setting == UNIFORM else list(self.weights.values())


class TaskWeighting:
    """An experiment's task weights: the experts' outputs are collected on the first ``auto``
    (one expert loaded at a time) and each merge's round-0 distances measured once."""

    def __init__(
        self,
        calib: Mapping[str, Sequence[Batch]],
        load_expert: Callable[[str], nn.Module],
        *,
        rounds: int = AUTO_ROUNDS,
        device: torch.device | None = None,
    ) -> None:
        self.calib = calib
        self.tasks = list(calib)
        self.load_expert = load_expert
        self.rounds = rounds
        self.device = device
        self._experts: ExpertOutputs | None = None
        self._merges: dict[str, dict[str, float]] = {}

    def choose(
        self,
        setting: TaskWeightSetting,
        merge: str,
        merged: nn.Module,
        quantize: Callable[[list[float]], nn.Module],
    ) -> ChosenWeights:
        """The weights of a model of merge ``merge`` (``merged``) under ``setting``."""
        if setting == UNIFORM:
            return ChosenWeights(UNIFORM, {task: 1.0 for task in self.tasks})
        if isinstance(setting, Mapping):
            given = {task: float(setting.get(task, 1.0)) for task in self.tasks}  # unnamed: 1
            return ChosenWeights("given", given)
        from epmq.models import adapter_for

        adapter = adapter_for(merged)
        if self._experts is None:
            self._experts = ExpertOutputs.collect(
                self.load_expert, adapter, self.calib, self.device
            )
        if merge not in self._merges:
            self._merges[merge] = distances(merged, adapter, self.calib, self._experts, self.device)
        found = auto_task_weights(
            merged, adapter, self.calib, self._experts, rounds=self.rounds, quantize=quantize,
            merge_distances=self._merges[merge], device=self.device,
        )  # fmt: skip
        return ChosenWeights(AUTO, found.weights, found.rounds)


@dataclass
class AutoWeights:
    """The weights ``auto`` chose, and each round's distances (round 0: the merge's)."""

    weights: dict[str, float]
    rounds: list[dict[str, float]] = field(default_factory=list)


def auto_task_weights(
    merged: nn.Module,
    adapter: BlockAdapter,
    calib: Mapping[str, Sequence[Batch]],
    experts: ExpertOutputs,
    *,
    rounds: int = AUTO_ROUNDS,
    quantize: Callable[[list[float]], nn.Module] | None = None,
    merge_distances: Mapping[str, float] | None = None,
    device: torch.device | None = None,
) -> AutoWeights:
    """``auto``'s weights for ``merged`` (see the module docs): round 0 from the merge's
    distances (``merge_distances`` when already measured), then ``rounds`` rounds, each
    quantizing with ``quantize(weights in task order)`` and measuring the quantized model."""
    if rounds > 0 and quantize is None:
        raise EpmqError("auto task weights with rounds > 0 need a quantize function")
    found = dict(merge_distances or distances(merged, adapter, calib, experts, device))
    result = AutoWeights(initial_weights(found), [found])
    for _ in range(rounds):
        assert quantize is not None
        model = quantize([result.weights[t] for t in calib])
        found = distances(model, adapter, calib, experts, device)
        del model
        result.rounds.append(found)
        result.weights = reweighted(result.weights, found)
    return result
