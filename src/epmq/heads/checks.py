"""Load-time checks of every expert's head on its own calibration examples.

A head that is read the wrong way gives no error, only a bad accuracy that looks like a weak
merge. Before any merging, each expert is evaluated with its head on its task's calibration
draw (one forward pass over those examples) and two mistakes are refused:

- **Class order.** Without ``classes``, string labels are taken in sorted order
  (:mod:`epmq.data.labels`); a head trained with another order then scores against shuffled
  labels. The accuracy under the assumed order is compared with the best one-to-one matching
  of the head's outputs to the classes (Hungarian assignment on the confusion matrix). When
  the matching is far better, the run is refused with the ``classes:`` list that matches.
- **head_input.** A linear head file reads some feature of the model (text: mean / cls /
  pooler; images: pooled / normalized / projected / mean_patch, the family's
  ``head_inputs``). When the expert is near chance, every other value is scored; when one of
  them is sane, the run is refused naming it, else one warning line says the head is weak.

The rules, with ``chance`` the share of the most frequent class in the calibration labels
(what a head that always predicts one class reaches) and ``n`` the calibration examples:

- *sane*: accuracy ≥ chance + (1 − chance) / 2 (halfway from chance to perfect);
- *near chance*: accuracy < chance + (1 − chance) / 4;
- *far better*: at least :data:`FAR_BETTER` (20 points) above the accuracy compared with;
- refusals need ``n ≥ max(20, 5 · classes)``: on fewer examples the best matching of a random
  head's outputs is too often "far better" by luck, so a smaller draw is only logged.

Heads built from the class names (CLIP zero-shot heads, T5 / causal-LM label words) follow the
task's class order by construction and are not checked. Heads inside ``*ForSequence``/
``*ForImageClassification`` checkpoints get the class-order check only (they have no
``head_input``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from epmq.data import Examples, TaskData
from epmq.errors import EpmqError
from epmq.heads.base import ExpertFields, ExpertView, FamilyTasks, TaskFields
from epmq.suites.classifier import HEAD_FILE

log = logging.getLogger(__name__)

#: how much better (as a fraction of examples) a matching or another head_input must score
FAR_BETTER = 0.2
#: the fewest calibration examples a refusal rests on, and per class
MIN_EXAMPLES, MIN_PER_CLASS = 20, 5
#: architectures whose checkpoint holds the task's head (its outputs are class positions)
_HEAD_IN_CHECKPOINT = ("ForSequenceClassification", "ForImageClassification")


@dataclass(frozen=True)
class HeadScore:
    """How an expert's head does on its calibration examples."""

    accuracy: float  # under the task's class order
    matched: float  # under the best one-to-one matching of head outputs to classes
    matching: tuple[int, ...]  # matching[j]: the class head output j stands for
    chance: float  # share of the most frequent class
    examples: int

    @property
    def checkable(self) -> bool:
        """Whether the draw is large enough for a refusal (see the module docstring)."""
        return self.examples >= max(MIN_EXAMPLES, MIN_PER_CLASS * len(self.matching))

    def sane(self, accuracy: float) -> bool:
        return accuracy >= self.chance + (1.0 - self.chance) / 2

    def near_chance(self, accuracy: float) -> bool:
        return accuracy < self.chance + (1.0 - self.chance) / 4


def score(predicted: Tensor, labels: Sequence[int], outputs: int) -> HeadScore:
    """Accuracy of ``predicted`` classes against ``labels`` as ordered and best matched.

    The confusion matrix ``C[j, c]`` counts examples the head gives output ``j`` whose label is
    ``c``; the matching ``m`` maximising ``Σ_j C[j, m(j)]`` (a permutation: Hungarian
    assignment) gives the matched accuracy ``Σ_j C[j, m(j)] / n``; as ordered it is
    ``trace(C) / n``.
    """
    truth = np.asarray(labels, dtype=np.int64)
    guess = predicted.cpu().numpy().astype(np.int64)
    size = max(outputs, int(truth.max(initial=0)) + 1, int(guess.max(initial=0)) + 1)
    confusion = np.zeros((size, size), dtype=np.int64)
    np.add.at(confusion, (guess, truth), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    matching = [0] * size
    for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
        matching[row] = col
    n = max(len(truth), 1)
    return HeadScore(
        accuracy=float(np.trace(confusion)) / n,
        matched=float(confusion[rows, cols].sum()) / n,
        matching=tuple(matching),
        chance=float(np.bincount(truth).max(initial=0)) / n,
        examples=len(truth),
    )


def head_from_file(expert: ExpertFields) -> bool:
    """Whether the expert's head is a linear head file (its ``head`` field, or
    ``head.safetensors`` beside it)."""
    return expert.head is not None or (Path(expert.path) / HEAD_FILE).is_file()


def head_in_checkpoint(expert: ExpertFields) -> bool:
    """Whether the expert folder's ``config.json`` names a task-model architecture whose
    checkpoint holds the classifier."""
    try:
        config = json.loads((Path(expert.path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    names = config.get("architectures") if isinstance(config, dict) else None
    return any(str(a).endswith(_HEAD_IN_CHECKPOINT) for a in names or ())


@torch.inference_mode()
def predictions(
    logic: FamilyTasks,
    model: nn.Module,
    head: Any,
    task: TaskFields,
    examples: Examples,
    batch_size: int,
) -> Tensor:
    """The predicted class of every example (the model in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return logic.predict(model, head, task, examples, batch_size).cpu()
    finally:
        model.train(was_training)


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def check_class_order(
    task: TaskFields, data: TaskData, expert: ExpertFields, found: HeadScore
) -> None:
    """Refuse a head whose outputs match the classes far better in another order."""
    if not (found.checkable and found.sane(found.matched)):
        return
    if found.matched < found.accuracy + FAR_BETTER:
        return
    if any(c >= len(data.classes) for c in found.matching):
        return  # a head output matches no named class: no classes list to suggest
    order = ", ".join(data.classes[c] for c in found.matching)
    raise EpmqError(
        f"task {task.name}: expert {expert.name}'s head predicts the classes in another order "
        f"({_percent(found.accuracy)} on calibration data as ordered, "
        f"{_percent(found.matched)} matched); set classes: [{order}]"
    )


def check_head_input(
    logic: FamilyTasks,
    model: nn.Module,
    task: TaskFields,
    data: TaskData,
    expert: ExpertFields,
    examples: Examples,
    found: HeadScore,
    predicted: Tensor,
    batch_size: int,
) -> None:
    """For a head near chance: refuse naming a ``head_input`` that scores sanely (a linear
    head file of a family with ``head_inputs``), else one warning line."""
    tried: dict[str, float] = {}
    current = expert.head_input
    if head_from_file(expert) and found.checkable:
        labels = torch.as_tensor(examples.labels, dtype=torch.long)
        for value in logic.head_inputs:
            if value == expert.head_input:
                continue
            try:
                head = logic.head(task, data, ExpertView.of(expert, head_input=value))
            except EpmqError:  # a feature this model does not have (no pooler, projection)
                continue
            other = predictions(logic, model, head, task, examples, batch_size)
            if current is None and torch.equal(other, predicted):
                current = value  # the family's default reads this feature
                continue
            tried[value] = float((other == labels).float().mean())
    now = f"{current or 'as read'}: {_percent(found.accuracy)}"
    if tried:
        best = max(tried, key=lambda v: tried[v])
        if found.sane(tried[best]) and tried[best] >= found.accuracy + FAR_BETTER:
            raise EpmqError(
                f"task {task.name}: expert {expert.name}'s head scores near chance "
                f"({_percent(found.accuracy)} on calibration data, chance "
                f"{_percent(found.chance)}); set head_input: {best} "
                f"({_percent(tried[best])} on calibration data; {now})"
            )
    others = ", ".join(f"{v}: {_percent(a)}" for v, a in tried.items())
    log.warning(
        "task %s: expert %s's head reaches only %s on its %d calibration examples (chance %s)%s",
        task.name,
        expert.name,
        _percent(found.accuracy),
        found.examples,
        _percent(found.chance),
        f"; no other head_input does better ({others})" if others else "",
    )


def check_expert_head(
    logic: FamilyTasks,
    task: TaskFields,
    data: TaskData,
    expert: ExpertFields,
    head: Any,
    examples: Examples,
    batch_size: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> float | None:
    """Check ``expert``'s head on ``examples`` (the task's calibration draw, see the module
    docstring); returns its accuracy there, or None for a head built from class names (not
    checked). The expert model is loaded for this (held in ``dtype``, run on ``device``, as
    the experts' row evaluates it) and released afterwards."""
    if not (head_from_file(expert) or head_in_checkpoint(expert)) or len(examples) == 0:
        return None
    model = logic.load_model(Path(expert.path)).to(device=device, dtype=dtype)
    try:
        predicted = predictions(logic, model, head, task, examples, batch_size)
        outputs = int(getattr(head, "out_features", 0) or len(data.classes))
        found = score(predicted, examples.labels, outputs)
        if not found.checkable:
            log.info(
                "task %s: %d calibration examples are too few to check expert %s's head "
                "(%s on them)",
                task.name,
                found.examples,
                expert.name,
                _percent(found.accuracy),
            )
            return found.accuracy
        check_class_order(task, data, expert, found)
        if found.near_chance(found.accuracy):
            check_head_input(
                logic, model, task, data, expert, examples, found, predicted, batch_size
            )
        return found.accuracy
    finally:
        del model
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
