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

from epmq.data import TaskData
from epmq.errors import EpmqError
from epmq.heads.base import ExpertFields, HeadOptions, TaskFields, label_words
from epmq.heads.encoder import linear_head
from epmq.heads.images import ImageHead, ImageTasks
from epmq.models.adapter import BlockAdapter
from epmq.models.clip import FEATURE_KINDS, IMAGE_CLASSIFIER, classify, zero_shot_head
from epmq.models.folder import from_folder, read_config
from epmq.suites.classifier import HEAD_FILE

DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: the tensors of a full CLIP folder that its vision tower does not hold
_NOT_VISION = ("text_model", "text_projection", "visual_projection", "logit_scale", "classifier")


class ClipTasks(ImageTasks):
    """Image classification with a CLIP vision tower (see the module docstring)."""

    head_inputs = FEATURE_KINDS
    #: what FusionBench's heads (and zero-shot heads) read
    default_head_input = "normalized"
    classifier_architecture = IMAGE_CLASSIFIER
    #: ``CLIPForImageClassification.forward``: the mean of ``last_hidden_state[:, 1:]``
    classifier_input = "mean_patch"

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        super().__init__(adapter, base_dir, options)
        raw = self.raw_config
        is_classifier = IMAGE_CLASSIFIER in (raw.get("architectures") or [])
        # a CLIPForImageClassification base keeps CLIPModel's config but has no text tower
        self.is_full_clip = raw.get("model_type") == "clip" and not is_classifier
        self._full: nn.Module | None = None
        self.projection = self._projection(raw)

    def vision_config(self, raw: dict[str, Any]) -> dict[str, Any]:
        return raw.get("vision_config", raw) if raw.get("model_type") == "clip" else raw

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
        """The vision tower alone; a full CLIP folder's text tower and projections (and a
        classifier's head) are left out on purpose (the base's ``visual_projection`` is read
        once, in ``__init__``)."""
        from transformers import CLIPVisionModel

        read_config(folder)
        model = from_folder(CLIPVisionModel, folder, unused=_NOT_VISION)
        return model.eval()

    def feature_width(self, reads: str) -> int:
        """The width of the image features of kind ``reads``."""
        if reads in ("normalized", "projected") and self.projection is not None:
            return int(self.projection.out_features)
        return int(self.vision.get("hidden_size", 0))

    def head_input(self, expert: ExpertFields) -> str:
        reads = super().head_input(expert)
        if reads == "projected" and self.projection is None:
            raise EpmqError(
                f"expert {expert.name}: head_input 'projected' needs a visual_projection, but "
                f"the base {self.base_dir} has none; use 'pooled' for its raw pooled output"
            )
        return reads

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> nn.Module:
        self.require_images(task, data)
        if self.has_head_file(expert):
            reads = self.head_input(expert)
            linear = linear_head(expert, self.feature_width(reads), f"{reads} feature width")
            self.check_labels(task, data, linear.out_features, f"expert {expert.name}'s head")
            return ImageHead(linear, reads)
        if self.is_classifier(expert):
            head = self.checkpoint_classifier(expert, self.feature_width(self.classifier_input))
            self.check_labels(task, data, head.out_features, f"expert {expert.name}'s classifier")
            return head
        if expert.head_input not in (None, self.default_head_input):
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

    def logits(self, model: nn.Module, head: nn.Module, pixels: Tensor) -> Tensor:
        # a plain linear head (zero-shot) reads the normalised embeddings
        reads = str(getattr(head, "reads", self.default_head_input))
        return classify(model, head, pixels, self.projection, reads=reads)
