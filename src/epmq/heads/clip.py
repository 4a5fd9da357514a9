"""CLIP vision encoders with zero-shot or linear heads, as FusionBench evaluates them.

Only the vision tower is merged and quantized: every expert and the base are loaded as
``CLIPVisionModel`` (from a ``CLIPModel``, ``CLIPVisionModel`` or
``CLIPVisionModelWithProjection`` folder). Images become the L2-normalised image embeddings:
the pooled output through the *pretrained* base's ``visual_projection`` when the base folder
has one (kept fixed, not merged), else the pooled output itself.

Heads read those embeddings. An expert with a head file (``head.safetensors`` beside it, or
its ``head`` field) uses that linear head; otherwise the task gets a zero-shot head built from
its class names (``label_words`` when given) and prompt ``templates`` (default
``"a photo of a {}."``) with the base's text encoder, which needs a full ``CLIPModel`` base.

Preprocessing (resize, centre crop, normalisation) comes from the base folder's
``preprocessor_config.json``, else from the config's ``image`` block; the crop must equal the
model's ``image_size``.
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
from epmq.models.adapter import BlockAdapter
from epmq.models.clip import classify, zero_shot_head
from epmq.models.folder import from_folder, read_config
from epmq.suites.classifier import HEAD_FILE, quiet_transformers

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ClipTasks(FamilyTasks):
    """Image classification with a CLIP vision tower (see the module docstring)."""

    modality = "image"

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        super().__init__(adapter, base_dir, options)
        raw = read_config(base_dir)
        self.is_full_clip = raw.get("model_type") == "clip"
        self.vision = raw.get("vision_config", raw) if self.is_full_clip else raw
        self.image_size = int(self.vision.get("image_size", 224))
        self.preprocessing = self._preprocessing(options)
        self.preprocessing.check_model_size(self.image_size, f"model {base_dir}")
        self._full: nn.Module | None = None
        self.projection = self._projection(raw)

    def _preprocessing(self, options: HeadOptions) -> ImagePreprocessing:
        found = ImagePreprocessing.from_folder(self.base_dir)
        if found is not None:
            return found
        if options.image is None:
            raise EpmqError(
                f"{self.base_dir} has no preprocessor_config.json; give the image size and "
                "normalisation in the config's 'image' block"
            )
        return ImagePreprocessing.from_dict(dict(options.image))

    def _base_clip(self) -> nn.Module:
        """The whole pretrained base (text tower and projections), loaded once."""
        if self._full is None:
            with quiet_transformers():
                self._full = self.adapter.load(self.base_dir)
        return self._full

    def _projection(self, raw: dict[str, Any]) -> nn.Module | None:
        if self.is_full_clip or "CLIPVisionModelWithProjection" in (raw.get("architectures") or []):
            return self._base_clip().visual_projection.eval()
        return None

    def load_model(self, folder: Path) -> nn.Module:
        from transformers import CLIPVisionModel

        read_config(folder)
        with quiet_transformers():
            model = from_folder(CLIPVisionModel, folder)
        return model.eval()

    @property
    def feature_width(self) -> int:
        if self.projection is not None:
            return int(self.projection.out_features)
        return int(self.vision.get("hidden_size", 0))

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> nn.Module:
        if data.modality != "image":
            raise EpmqError(f"task {task.name}: CLIP reads images, but {data.source} holds text")
        has_file = expert.head is not None or (Path(expert.path) / HEAD_FILE).is_file()
        if has_file:
            head = linear_head(expert, self.feature_width, "image embedding width")
            self.check_labels(task, data, head.out_features, f"expert {expert.name}'s head")
            return head
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
            out.append(classify(model, head, pixels, self.projection).argmax(-1))
        return torch.cat(out)
