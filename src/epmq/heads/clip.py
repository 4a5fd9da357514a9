"""CLIP vision encoders with zero-shot or linear heads, as FusionBench evaluates them.

Only the vision tower is merged and quantized: every expert and the base are loaded as
``CLIPVisionModel`` (from a ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``
or ``CLIPForImageClassification`` folder). The *pretrained* base's ``visual_projection``, when
the base folder has one, is kept fixed (not merged).

Each task's head is, in this order:

- a head file (``head.safetensors`` beside the expert, or its ``head`` field): a linear head
  reading the features named by the expert's ``head_input`` (:data:`FEATURE_KINDS`: the
  L2-normalised image embedding ``normalized``, the default, which goes through the base's
  projection when it has one; the raw ``pooled`` output; ``projected``, not normalised; the
  ``mean_patch`` of the patch tokens);
- the ``classifier`` inside a ``CLIPForImageClassification`` expert, applied as that class's
  forward does: to the mean of ``last_hidden_state[:, 1:]`` (``mean_patch``);
- else a zero-shot head built from the task's class names (``label_words`` when given) and
  prompt ``templates`` (default ``"a photo of a {}."``) with the base's text encoder, which
  needs a full ``CLIPModel`` base; it reads the normalised embeddings.

Preprocessing (resize, centre crop, normalisation) comes from the base folder's
``preprocessor_config.json``, else from the config's ``image`` block; the crop must equal the
model's ``image_size``. Images become what the vision config's ``num_channels`` says (1: grey,
3: RGB), and the normalisation must give one mean and std per channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epmq.data import Examples, ImagePreprocessing, TaskData, load_images
from epmq.errors import EpmqError
from epmq.heads.base import (
    Batch,
    ExpertFields,
    FamilyTasks,
    HeadOptions,
    TaskFields,
    chunks,
    label_words,
)
from epmq.heads.encoder import linear_head
from epmq.merging.checkpoint import CheckpointReader
from epmq.models.adapter import BlockAdapter
from epmq.models.clip import (
    FEATURE_KINDS,
    IMAGE_CLASSIFIER,
    classify,
    zero_shot_head,
)
from epmq.models.folder import from_folder, read_config
from epmq.suites.classifier import HEAD_FILE

DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: the tensors of a full CLIP folder that its vision tower does not hold
_NOT_VISION = ("text_model", "text_projection", "visual_projection", "logit_scale", "classifier")
#: what a head file reads when the expert gives no ``head_input`` (what FusionBench's heads read)
DEFAULT_HEAD_INPUT = "normalized"
#: what a ``CLIPForImageClassification`` classifier reads (its forward's mean of patch tokens)
CLASSIFIER_INPUT = "mean_patch"


class ImageHead(nn.Linear):
    """A linear head that knows which image features it reads (``reads``, a
    :data:`FEATURE_KINDS` value); exported like any linear head (``weight``, ``bias``)."""

    def __init__(self, linear: nn.Linear, reads: str) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.reads = reads
        self.eval()


def head_reads(head: nn.Module) -> str:
    """The image features ``head`` reads (a plain linear head: the normalised embeddings)."""
    return str(getattr(head, "reads", DEFAULT_HEAD_INPUT))


class ClipTasks(FamilyTasks):
    """Image classification with a CLIP vision tower (see the module docstring)."""

    modality = "image"
    head_inputs = FEATURE_KINDS

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        super().__init__(adapter, base_dir, options)
        raw = read_config(base_dir)
        is_classifier = IMAGE_CLASSIFIER in (raw.get("architectures") or [])
        # a CLIPForImageClassification base keeps CLIPModel's config but has no text tower
        self.is_full_clip = raw.get("model_type") == "clip" and not is_classifier
        self.vision = raw.get("vision_config", raw) if raw.get("model_type") == "clip" else raw
        self.image_size = int(self.vision.get("image_size", 224))
        #: 1: grey images, 3: RGB (the vision config's num_channels)
        self.num_channels = int(self.vision.get("num_channels", 3))
        self.preprocessing = self._preprocessing(options)
        self.preprocessing.check_model_size(self.image_size, f"model {base_dir}")
        self._full: nn.Module | None = None
        self.projection = self._projection(raw)

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

    def _base_clip(self) -> nn.Module:
        """The whole pretrained base (text tower and projections), loaded once."""
        if self._full is None:
            self._full = self.adapter.load(self.base_dir)
        return self._full

    def _projection(self, raw: dict[str, Any]) -> nn.Module | None:
        if self.is_full_clip or "CLIPVisionModelWithProjection" in (raw.get("architectures") or []):
            return self._base_clip().visual_projection.eval()
        return None

    def load_model(self, folder: Path) -> nn.Module:
        """The vision tower alone; a full CLIP folder's text tower and projections are left
        out on purpose (the base's ``visual_projection`` is read once, in ``__init__``)."""
        from transformers import CLIPVisionModel

        read_config(folder)
        model = from_folder(CLIPVisionModel, folder, unused=_NOT_VISION)
        return model.eval()

    def feature_width(self, reads: str) -> int:
        """The width of the image features of kind ``reads``."""
        if reads in ("normalized", "projected") and self.projection is not None:
            return int(self.projection.out_features)
        return int(self.vision.get("hidden_size", 0))

    def _head_input(self, expert: ExpertFields) -> str:
        """The expert's ``head_input`` for a head file, checked (default: normalized)."""
        reads = expert.head_input or DEFAULT_HEAD_INPUT
        if reads not in FEATURE_KINDS:
            raise EpmqError(
                f"expert {expert.name}: head_input {reads!r} is not an image feature; use one "
                f"of {', '.join(FEATURE_KINDS)}"
            )
        if reads == "projected" and self.projection is None:
            raise EpmqError(
                f"expert {expert.name}: head_input 'projected' needs a visual_projection, but "
                f"the base {self.base_dir} has none; use 'pooled' for its raw pooled output"
            )
        return reads

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> nn.Module:
        if data.modality != "image":
            raise EpmqError(f"task {task.name}: CLIP reads images, but {data.source} holds text")
        has_file = expert.head is not None or (Path(expert.path) / HEAD_FILE).is_file()
        if has_file:
            reads = self._head_input(expert)
            linear = linear_head(expert, self.feature_width(reads), f"{reads} feature width")
            self.check_labels(task, data, linear.out_features, f"expert {expert.name}'s head")
            return ImageHead(linear, reads)
        if IMAGE_CLASSIFIER in (read_config(expert.path).get("architectures") or []):
            head = self._classifier(expert)
            self.check_labels(task, data, head.out_features, f"expert {expert.name}'s classifier")
            return head
        if expert.head_input not in (None, DEFAULT_HEAD_INPUT):
            raise EpmqError(
                f"expert {expert.name}: head_input {expert.head_input!r} describes a head file, "
                f"but {Path(expert.path) / HEAD_FILE} does not exist (a zero-shot head reads "
                "the normalized embeddings); remove head_input or give the head file"
            )
        if not self.is_full_clip:
            raise EpmqError(
                f"expert {expert.name}: no head file {Path(expert.path) / HEAD_FILE}, and the "
                f"base {self.base_dir} has no text encoder to build a zero-shot head"
            )
        from epmq.calib.text_data import load_tokenizer

        templates = task.templates or list(DEFAULT_TEMPLATES)
        names = label_words(task, data)
        with torch.no_grad():
            return zero_shot_head(
                self._base_clip(), load_tokenizer(self.base_dir), names, templates
            )

    def _classifier(self, expert: ExpertFields) -> ImageHead:
        """The ``classifier`` of a ``CLIPForImageClassification`` expert, reading the mean of
        the patch tokens as that class's forward does."""
        folder = Path(expert.path)
        if expert.head_input not in (None, CLASSIFIER_INPUT):
            raise EpmqError(
                f"expert {expert.name}: head_input {expert.head_input!r}, but the classifier "
                f"inside {folder} ({IMAGE_CLASSIFIER}) reads {CLASSIFIER_INPUT!r}; remove "
                "head_input"
            )
        reader = CheckpointReader(folder)
        missing = [n for n in ("classifier.weight", "classifier.bias") if n not in reader.meta]
        if missing:
            raise EpmqError(
                f"expert {expert.name}: {folder} is a {IMAGE_CLASSIFIER} but its checkpoint "
                f"lacks {', '.join(missing)}"
            )
        weight, bias = reader.get("classifier.weight"), reader.get("classifier.bias")
        width = self.feature_width(CLASSIFIER_INPUT)
        if weight.dim() != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
            raise EpmqError(
                f"expert {expert.name}: classifier in {folder} has weight "
                f"{tuple(weight.shape)} and bias {tuple(bias.shape)}; the base's vision "
                f"hidden size is {width}"
            )
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight.float())
            linear.bias.copy_(bias.float())
        return ImageHead(linear, CLASSIFIER_INPUT)

    def pixel_values(self, images: Examples) -> Tensor:
        return self.preprocessing.pixel_values(load_images(list(images.inputs)))

    def calibration_batches(
        self, task: TaskFields, head: Any, examples: Examples, batch_size: int
    ) -> list[Batch]:
        return [
            {"pixel_values": self.pixel_values(examples.subset(part))}
            for part in chunks(list(range(len(examples))), batch_size)
        ]

    def predict(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> Tensor:
        out = []
        for part in chunks(list(range(len(examples))), batch_size):
            pixels = self.pixel_values(examples.subset(part))
            logits = classify(model, head, pixels, self.projection, reads=head_reads(head))
            out.append(logits.argmax(-1))
        return torch.cat(out)
