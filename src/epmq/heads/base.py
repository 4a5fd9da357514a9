"""What a model family needs to run a user's classification tasks: the protocol.

A :class:`FamilyTasks` object is built once per experiment from the family's adapter class,
the base model folder and the :class:`HeadOptions`. It knows how to load the part of a
checkpoint that is merged and quantized (:meth:`load_model`), how to build each task's head (a
linear head file beside the expert, a CLIP zero-shot head, T5 label words, causal-LM
continuations), how to turn a task's examples into calibration batches for the calibration
engine, and how to predict a class per example.
Accuracy is the same for every family (:meth:`FamilyTasks.accuracy`).

Heads sit beside evaluation and never import the experiment layer: what they read of a task
and an expert is described here (:class:`TaskFields`, :class:`ExpertFields`, protocols that the
experiment config's specs satisfy) and the experiment-wide settings come as plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from epmq.data import Examples, TaskData
from epmq.errors import EpmqError
from epmq.models.adapter import BlockAdapter
from epmq.models.folder import check_vocabulary

Batch = dict[str, Any]


class TaskFields(Protocol):
    """What heads read of a task (the experiment's ``TaskSpec`` has these fields)."""

    @property
    def name(self) -> str: ...
    @property
    def max_length(self) -> int: ...
    @property
    def classes(self) -> Sequence[str] | None: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def label_words(self) -> Sequence[str] | None: ...
    @property
    def templates(self) -> Sequence[str] | None: ...


class ExpertFields(Protocol):
    """What heads read of an expert (the experiment's ``ExpertSpec`` has these fields)."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def head(self) -> Path | None: ...
    @property
    def head_input(self) -> str | None: ...


@dataclass(frozen=True)
class ExpertView:
    """An expert's fields as heads read them, e.g. with another ``head_input`` to try."""

    name: str
    path: Path
    head: Path | None = None
    head_input: str | None = None

    @classmethod
    def of(cls, expert: ExpertFields, **changes: Any) -> ExpertView:
        fields = {
            "name": expert.name,
            "path": Path(expert.path),
            "head": expert.head,
            "head_input": expert.head_input,
        }
        return cls(**{**fields, **changes})


@dataclass(frozen=True)
class HeadOptions:
    """Experiment-wide settings the heads read: the encoder's ``pooling``, for image models
    whose folder has no ``preprocessor_config.json`` the ``image`` preprocessing fields
    (``size``, ``crop_size``, ``mean``, ``std``), and whether task models' poolers are merged
    (``merge_pooler``) rather than kept per task in their heads."""

    pooling: Literal["mean", "cls"] = "mean"
    image: Mapping[str, Any] | None = None
    merge_pooler: bool = False


class FamilyTasks:
    """Base class of the per-family task logic (see the module docstring).

    The family's name and loader come from its adapter class (``adapter``), which names this
    class in its ``tasks`` declaration.
    """

    modality: str = "text"
    #: the values an expert's ``head_input`` may take for a linear head file (what features
    #: the head reads); empty when the family has no linear heads in files
    head_inputs: tuple[str, ...] = ()

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        self.adapter = adapter
        self.family = adapter.family
        self.base_dir = Path(base_dir)
        self.options = options

    def load_model(self, folder: Path) -> nn.Module:
        """The model (or tower) in ``folder`` that is merged, quantized and evaluated
        (default: the family's loader); a tokenizer beside the base must fit its vocabulary."""
        model = self.adapter.load(folder)
        check_vocabulary(model, getattr(self, "tokenizer", None), folder, self.base_dir)
        return model

    # -- to implement ---------------------------------------------------------------------

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> Any:
        """The head that turns the model's outputs on ``task`` into class scores."""
        raise NotImplementedError

    def calibration_batches(
        self, task: TaskFields, head: Any, examples: Examples, batch_size: int
    ) -> list[Batch]:
        """Model inputs for the calibration engine, ``batch_size`` examples per batch."""
        raise NotImplementedError

    def predict(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> Tensor:
        """The predicted class index of every example, in order."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def check_labels(self, task: TaskFields, data: TaskData, n_outputs: int, where: str) -> None:
        """Every label of every split must be one of the head's ``n_outputs`` classes, and
        the class list must match the head: the task's ``classes`` field exactly (a longer
        list names classes the head cannot predict, a shorter one leaves head outputs that
        name no class), classes that the data names or implies never more than the head
        has (integer labels may leave the head's last classes unused in the data)."""
        for split_name in ("train", "calib", "test"):
            split = getattr(data, split_name)
            if split is None or not split.labels:
                continue
            top = max(split.labels)
            if top >= n_outputs:
                raise EpmqError(
                    f"task {task.name}: label {data.classes[top]!r} (class {top}) in the "
                    f"{split_name} split is outside the {n_outputs} classes of {where}"
                )
        count = len(data.classes)
        if task.classes is not None and count != n_outputs:
            raise EpmqError(
                f"task {task.name}: field 'classes' lists {count} classes but {where} has "
                f"{n_outputs} outputs"
            )
        if count > n_outputs:
            raise EpmqError(
                f"task {task.name}: {data.source} names {count} classes but {where} has "
                f"{n_outputs} outputs"
            )

    @torch.inference_mode()
    def accuracy(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> float:
        """Fraction of ``examples`` whose predicted class equals the label."""
        if len(examples) == 0:
            raise EpmqError(f"task {task.name}: no test examples to evaluate")
        was_training = model.training
        model.eval()
        try:
            predicted = self.predict(model, head, task, examples, batch_size)
        finally:
            model.train(was_training)
        labels = torch.as_tensor(examples.labels, dtype=torch.long)
        return int((predicted.cpu() == labels).sum()) / len(labels)


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` cut into consecutive pieces of at most ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def label_words(task: TaskFields, data: TaskData) -> list[str]:
    """The words that name each class in generated text: ``label_words``, else class names
    (one word per class: an extra word would be a prediction that names no class)."""
    words = list(task.label_words) if task.label_words else list(data.classes)
    if len(words) != len(data.classes):
        raise EpmqError(
            f"task {task.name}: {len(words)} label_words for {len(data.classes)} classes "
            f"({', '.join(data.classes)})"
        )
    return words


def prompts(task: TaskFields, texts: Sequence[str], default: str) -> list[str]:
    """Each text placed into the task's ``prompt`` (``default`` when the task gives none)."""
    template = task.prompt or default
    return [template.replace("{text}", text) for text in texts]


def require_text(task: TaskFields, data: TaskData, family: str) -> None:
    if data.modality != "text":
        raise EpmqError(
            f"task {task.name}: {family} models read text, but {data.source} holds images"
        )
