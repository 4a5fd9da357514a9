"""ViT encoders with a linear head per task.

The encoder (``ViTModel`` without its pooler) is what is merged and quantized; each task's
head is, in this order:

- a head file (``head.safetensors`` beside the expert, or its ``head`` field): a linear head
  reading the features named by the expert's ``head_input``: ``cls`` (default) the class token
  of the final, layer-normalised hidden states, or ``mean_patch`` the mean of the patch tokens;
- the ``classifier`` inside a ``ViTForImageClassification`` expert, applied as that class's
  forward does: to ``last_hidden_state[:, 0]`` (``cls``).

Preprocessing, batching and grey models as for every image family (:mod:`epmq.heads.images`).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from epmq.data import TaskData
from epmq.errors import EpmqError
from epmq.heads.base import ExpertFields, TaskFields
from epmq.heads.encoder import linear_head
from epmq.heads.images import ImageHead, ImageTasks
from epmq.models.folder import from_folder, read_config
from epmq.models.vit import FEATURE_KINDS, IMAGE_CLASSIFIER, vit_features
from epmq.suites.classifier import HEAD_FILE


class VitTasks(ImageTasks):
    """Image classification with a ViT encoder (see the module docstring)."""

    head_inputs = FEATURE_KINDS
    default_head_input = "cls"
    classifier_architecture = IMAGE_CLASSIFIER
    #: ``ViTForImageClassification.forward``: ``last_hidden_state[:, 0]``
    classifier_input = "cls"

    def load_model(self, folder: Path) -> nn.Module:
        """The encoder without pooler or classifier (both belong to the task's head)."""
        from transformers import ViTModel

        read_config(folder)
        model = from_folder(
            ViTModel, folder, add_pooling_layer=False, unused=("pooler", "classifier")
        )
        return model.eval()

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> nn.Module:
        self.require_images(task, data)
        width = int(self.vision.get("hidden_size", 0))
        if self.has_head_file(expert):
            reads = self.head_input(expert)
            linear = linear_head(expert, width, "hidden size")
            self.check_labels(task, data, linear.out_features, f"expert {expert.name}'s head")
            return ImageHead(linear, reads)
        if self.is_classifier(expert):
            head = self.checkpoint_classifier(expert, width)
            self.check_labels(task, data, head.out_features, f"expert {expert.name}'s classifier")
            return head
        raise EpmqError(
            f"expert {expert.name}: no head file {Path(expert.path) / HEAD_FILE} and not a "
            f"{IMAGE_CLASSIFIER}; give the expert's linear head (tensors 'weight' "
            "[n_classes, hidden] and 'bias') or its classifier checkpoint"
        )

    def logits(self, model: nn.Module, head: nn.Module, pixels: Tensor) -> Tensor:
        reads = str(getattr(head, "reads", self.default_head_input))
        features = vit_features(model, pixels, reads)
        return head(features.to(device=head.weight.device, dtype=head.weight.dtype))
