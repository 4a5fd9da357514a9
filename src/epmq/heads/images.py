"""What every image family's tasks share: preprocessing, batching, linear heads that know
which features they read, and classifiers kept inside fine-tuned checkpoints.

:class:`ImageTasks` reads the base's vision config (``image_size``, ``num_channels``: 1 grey,
3 RGB), its ``preprocessor_config.json`` (else the config's ``image`` block), turns a task's
images into ``pixel_values`` and predicts a class per example through the family's
:meth:`ImageTasks.logits`. A family (CLIP, ViT) says how a head reads the model's outputs.

A head is an :class:`ImageHead`: a linear layer plus the name of the features it reads
(``reads``), so heads of different conventions can sit side by side in one experiment; it is
exported like any linear head (``weight``, ``bias``). :meth:`ImageTasks.checkpoint_classifier`
reads the ``classifier.*`` of a ``*ForImageClassification`` expert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epmq.data import Examples, ImagePreprocessing, TaskData, load_images
from epmq.errors import EpmqError
from epmq.heads.base import Batch, ExpertFields, FamilyTasks, HeadOptions, TaskFields, chunks
from epmq.merging.checkpoint import CheckpointReader
from epmq.models.adapter import BlockAdapter
from epmq.models.folder import read_config
from epmq.suites.classifier import HEAD_FILE


class ImageHead(nn.Linear):
    """A linear head that knows which image features it reads (``reads``, one of its
    family's ``head_inputs``); exported like any linear head (``weight``, ``bias``)."""

    def __init__(self, linear: nn.Linear, reads: str) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.reads = reads
        self.eval()


class ImageTasks(FamilyTasks):
    """Image classification: the parts every vision family shares (module docstring)."""

    modality = "image"
    #: what a head file reads when the expert gives no ``head_input``
    default_head_input: str = ""
    #: the ``architectures`` name of the family's fine-tuned classifier with its head inside
    classifier_architecture: str = ""
    #: what that classifier reads, as its forward computes it
    classifier_input: str = ""

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        super().__init__(adapter, base_dir, options)
        self.raw_config = read_config(base_dir)
        self.vision = self.vision_config(self.raw_config)
        self.image_size = int(self.vision.get("image_size", 224))
        #: 1: grey images, 3: RGB (the vision config's num_channels)
        self.num_channels = int(self.vision.get("num_channels", 3))
        self.preprocessing = self._preprocessing(options)
        self.preprocessing.check_model_size(self.image_size, f"model {base_dir}")

    def vision_config(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The part of the base's ``config.json`` that describes the vision model."""
        return raw

    def _preprocessing(self, options: HeadOptions) -> ImagePreprocessing:
        found = ImagePreprocessing.from_folder(self.base_dir, self.num_channels)
        if found is not None:
            return found
        if options.image is None:
            raise EpmqError(
                f"{self.base_dir} has no preprocessor_config.json; give the image size and "
                "normalisation in the config's 'image' block"
            )
        return ImagePreprocessing.from_dict(
            dict(options.image), "the config's 'image' block", self.num_channels
        )

    # -- heads ----------------------------------------------------------------------------
    def require_images(self, task: TaskFields, data: TaskData) -> None:
        if data.modality != "image":
            raise EpmqError(
                f"task {task.name}: {self.family} reads images, but {data.source} holds text"
            )

    def has_head_file(self, expert: ExpertFields) -> bool:
        return expert.head is not None or (Path(expert.path) / HEAD_FILE).is_file()

    def head_input(self, expert: ExpertFields) -> str:
        """The expert's ``head_input`` for a head file, checked (default:
        :attr:`default_head_input`)."""
        reads = expert.head_input or self.default_head_input
        if reads not in self.head_inputs:
            raise EpmqError(
                f"expert {expert.name}: head_input {reads!r} is not a {self.family} image "
                f"feature; use one of {', '.join(self.head_inputs)}"
            )
        return reads

    def is_classifier(self, expert: ExpertFields) -> bool:
        """Whether the expert folder is the family's fine-tuned classifier (head inside)."""
        names = read_config(expert.path).get("architectures") or []
        return bool(self.classifier_architecture) and self.classifier_architecture in names

    def checkpoint_classifier(self, expert: ExpertFields, width: int) -> ImageHead:
        """The ``classifier`` (weight, bias) inside the expert's checkpoint, reading
        :attr:`classifier_input` features ``width`` wide as the class's forward does."""
        folder = Path(expert.path)
        if expert.head_input not in (None, self.classifier_input):
            raise EpmqError(
                f"expert {expert.name}: head_input {expert.head_input!r}, but the classifier "
                f"inside {folder} ({self.classifier_architecture}) reads "
                f"{self.classifier_input!r}; remove head_input"
            )
        reader = CheckpointReader(folder)
        missing = [n for n in ("classifier.weight", "classifier.bias") if n not in reader.meta]
        if missing:
            raise EpmqError(
                f"expert {expert.name}: {folder} is a {self.classifier_architecture} but its "
                f"checkpoint lacks {', '.join(missing)}"
            )
        weight, bias = reader.get("classifier.weight"), reader.get("classifier.bias")
        if weight.dim() != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
            raise EpmqError(
                f"expert {expert.name}: classifier in {folder} has weight "
                f"{tuple(weight.shape)} and bias {tuple(bias.shape)}; the base's hidden size "
                f"is {width}"
            )
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight.float())
            linear.bias.copy_(bias.float())
        return ImageHead(linear, self.classifier_input)

    # -- batches and predictions ----------------------------------------------------------
    def pixel_values(self, images: Examples) -> Tensor:
        return self.preprocessing.pixel_values(load_images(list(images.inputs)))

    def calibration_batches(
        self, task: TaskFields, head: Any, examples: Examples, batch_size: int
    ) -> list[Batch]:
        return [
            {"pixel_values": self.pixel_values(examples.subset(part))}
            for part in chunks(list(range(len(examples))), batch_size)
        ]

    def logits(self, model: nn.Module, head: nn.Module, pixels: Tensor) -> Tensor:
        """Class scores ``[batch, classes]`` of ``head`` on ``model``'s outputs."""
        raise NotImplementedError

    def predict(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> Tensor:
        out = []
        for part in chunks(list(range(len(examples))), batch_size):
            out.append(self.logits(model, head, self.pixel_values(examples.subset(part))))
        return torch.cat([logits.argmax(-1).cpu() for logits in out])
