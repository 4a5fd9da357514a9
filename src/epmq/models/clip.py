"""CLIP vision encoders: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``.

Only the vision tower is merged and quantized (FusionBench style: the text encoder stays
pretrained and only builds zero-shot heads). The blocks are ``CLIPEncoderLayer`` s at
``encoder.layers.N`` (``CLIPVisionModel``, transformers 5.x) or
``vision_model.encoder.layers.N`` (``CLIPModel``, ``CLIPVisionModelWithProjection``), called
as ``layer(hidden_states, attention_mask=None)`` and returning the new hidden states; the first
block's inputs are the pre-layernorm'ed patch embeddings, captured as the model computes them.
Linears per block, in true-sequential order: ``self_attn.{q,k,v}_proj``,
``self_attn.out_proj``, ``mlp.fc1``, ``mlp.fc2``.

A ``CLIPForImageClassification`` folder (``vision_model.*`` and ``classifier.*``) loads as that
class; its blocks sit at ``vision_model.encoder.layers.N`` too.

Heads: :func:`zero_shot_head` builds a task's classifier from class names and prompt templates
through the pretrained text encoder; :func:`image_features` gives the image features it (the
normalised image embeddings) or a linear head reads (:data:`FEATURE_KINDS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.models.adapter import Batch, BlockAdapter, Stage, register_adapter
from epmq.models.folder import from_folder, read_config

Template = str | Callable[[str], str]

_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)

_CLASSES = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
#: a fine-tuned image classifier: ``vision_model.*`` (the tower) and ``classifier.*`` (the head)
IMAGE_CLASSIFIER = "CLIPForImageClassification"


def vision_tower(model: nn.Module) -> nn.Module:
    """The module that maps ``pixel_values`` to vision features (the model itself or its
    ``vision_model``)."""
    tower = getattr(model, "vision_model", None)
    return tower if isinstance(tower, nn.Module) else model


@register_adapter
class ClipVisionAdapter(BlockAdapter):
    """Adapter for CLIP vision encoders (one stage: the vision encoder's layer list)."""

    family = "clip"
    model_types = ("clip", "clip_vision_model")
    tasks = "epmq.heads.clip:ClipTasks"
    sequential_groups = _GROUPS
    input_producers: ClassVar[Mapping[str, str]] = {
        "self_attn.q_proj": "layer_norm1",
        "self_attn.k_proj": "layer_norm1",
        "self_attn.v_proj": "layer_norm1",
        "self_attn.out_proj": "self_attn.v_proj",
        "mlp.fc1": "layer_norm2",
    }
    norm_sites = (("layer_norm1", None), ("layer_norm2", "self_attn.out_proj"))

    def stages(self, model: nn.Module) -> list[Stage]:
        return [self.find_stage(model, "vision", ("encoder.layers", "vision_model.encoder.layers"))]

    def run_model(self, model: nn.Module, batch: Batch) -> None:
        """Run only the vision tower on the batch's ``pixel_values`` (no text needed)."""
        if "pixel_values" not in batch:
            raise EpmqError(
                f"CLIP calibration batch has no 'pixel_values' (keys: {', '.join(batch)})"
            )
        vision_tower(model)(pixel_values=batch["pixel_values"])

    def token_mask(self, stage: Stage, batch: Batch) -> Tensor | None:
        """Every patch token (and the class token) counts."""
        return None

    @staticmethod
    def load(path: str | Path, **kwargs: Any) -> nn.Module:
        """:func:`load_clip`."""
        return load_clip(path, **kwargs)


def load_clip(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a CLIP model from a local folder (no hub access), in eval mode.

    The class follows ``config.json``: ``model_type`` ``clip`` → ``CLIPModel`` (or
    ``CLIPForImageClassification`` when ``architectures`` names it);
    ``clip_vision_model`` → the class named in ``architectures`` (``CLIPVisionModel`` or
    ``CLIPVisionModelWithProjection``; ``CLIPVisionModel`` when none is named). A
    compressed-tensors export loads dequantized (:func:`~epmq.models.folder.from_folder`).
    """
    import transformers

    path = Path(path)
    config_file = path / "config.json"
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type == "clip":
        # a fine-tuned classifier keeps CLIPModel's config (text tower included) but not its
        # text tower's weights: it loads as what it is
        classifier = IMAGE_CLASSIFIER in (config.get("architectures") or [])
        name = IMAGE_CLASSIFIER if classifier else "CLIPModel"
    elif model_type == "clip_vision_model":
        named = [a for a in config.get("architectures") or [] if a in _CLASSES[1:]]
        name = named[0] if named else "CLIPVisionModel"
    else:
        raise EpmqError(
            f"{config_file}: model_type {model_type!r} is not a CLIP model "
            "(expected 'clip' or 'clip_vision_model')"
        )
    model = from_folder(getattr(transformers, name), path, **kwargs)
    model.eval()
    return model


# -- heads ------------------------------------------------------------------------------------
#: what a linear head on a CLIP vision tower reads (an expert's ``head_input``):
#: ``normalized`` the L2-normalised image embedding (through a visual projection when there is
#: one: FusionBench's heads and zero-shot heads), ``pooled`` the raw ``pooler_output``
#: (post-layernorm class token, what a plain ``nn.Linear`` on ``CLIPVisionModel`` is usually
#: trained on), ``projected`` the pooled output through the visual projection, not normalised,
#: ``mean_patch`` the mean of the patch tokens of ``last_hidden_state`` (class token left out:
#: what ``CLIPForImageClassification`` feeds its classifier)
FEATURE_KINDS = ("normalized", "pooled", "projected", "mean_patch")


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


def own_projection(model: nn.Module) -> nn.Module | None:
    """The model's own ``visual_projection`` (``CLIPModel``, ``CLIPVisionModelWithProjection``)."""
    found = getattr(model, "visual_projection", None)
    return found if isinstance(found, nn.Module) else None


@torch.no_grad()
def image_features(
    model: nn.Module,
    pixel_values: Tensor,
    projection: nn.Module | None = None,
    *,
    reads: str = "normalized",
) -> Tensor:
    """Image features ``[batch, dim]`` of a CLIP vision model, of kind ``reads``
    (:data:`FEATURE_KINDS`; default the L2-normalised image embeddings).

    ``CLIPModel`` and ``CLIPVisionModelWithProjection`` apply their own visual projection; a
    bare ``CLIPVisionModel`` gives its pooled output, projected by ``projection`` when given
    (e.g. the pretrained ``CLIPModel.visual_projection``, as FusionBench does).
    """
    if reads not in FEATURE_KINDS:
        raise EpmqError(f"unknown CLIP image feature {reads!r} (known: {', '.join(FEATURE_KINDS)})")
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    outputs = vision_tower(model)(pixel_values=pixel_values)
    if reads == "mean_patch":
        return outputs.last_hidden_state[:, 1:].mean(dim=1)
    embeds = outputs.pooler_output
    if reads == "pooled":
        return embeds
    projection = own_projection(model) or projection
    if projection is not None:
        embeds = projection(embeds.to(next(projection.parameters()).device))
    elif reads == "projected":
        raise EpmqError(
            f"{type(model).__name__} has no visual_projection, and none was given: there is no "
            "projected image feature"
        )
    return _normalize(embeds) if reads == "normalized" else embeds


def _prompt(template: Template, class_name: str) -> str:
    return template(class_name) if callable(template) else template.format(class_name)


@torch.no_grad()
def zero_shot_head(
    clip_model: nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[Template],
) -> nn.Linear:
    """A zero-shot classifier from class names and prompt templates (FusionBench style).

    For each class, every template (a ``str.format`` pattern with one ``{}``, or a callable
    taking the class name) is encoded by the text tower of ``clip_model`` (a ``CLIPModel``);
    the normalised text embeddings are averaged over templates and normalised again, then
    scaled by ``exp(logit_scale)``. The returned bias-free ``nn.Linear`` maps normalised image
    embeddings (:func:`image_features`) to logits; with one template it reproduces
    ``CLIPModel``'s ``logits_per_image`` for those prompts.
    """
    if not hasattr(clip_model, "get_text_features"):
        raise EpmqError(
            f"zero_shot_head needs a CLIPModel with a text tower, got {type(clip_model).__name__}"
        )
    if not class_names:
        raise EpmqError("zero_shot_head: class_names is empty")
    if not templates:
        raise EpmqError("zero_shot_head: templates is empty")
    rows = []
    for name in class_names:
        texts = [_prompt(t, name) for t in templates]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        out = clip_model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
        )
        embeds = out.pooler_output if hasattr(out, "pooler_output") else out
        rows.append(_normalize(_normalize(embeds.float()).mean(dim=0)))
    weight = torch.stack(rows) * clip_model.logit_scale.detach().float().exp()
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data.copy_(weight)
    return head


@torch.no_grad()
def classify(
    model: nn.Module,
    head: nn.Module,
    pixel_values: Tensor,
    projection: nn.Module | None = None,
    *,
    reads: str = "normalized",
) -> Tensor:
    """Logits ``[batch, classes]``: ``head`` applied to the image features of kind ``reads``
    (default the normalised image embeddings, :func:`image_features`)."""
    features = image_features(model, pixel_values, projection, reads=reads)
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor):
        features = features.to(device=weight.device, dtype=weight.dtype)
    return head(features)
