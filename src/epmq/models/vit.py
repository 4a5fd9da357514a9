"""ViT image encoders: ``ViTModel`` and ``ViTForImageClassification``.

The blocks are ``ViTLayer`` s, pre-norm (``layernorm_before`` → attention, ``layernorm_after`` →
MLP), called as ``layer(hidden_states, attention_mask)`` and returning the new hidden states.
On disk they sit at ``encoder.layer.N`` (``vit.encoder.layer.N`` in a classifier) with linears
``attention.attention.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``
and ``output.dense``; transformers 5 loads them as ``layers.N`` with ``attention.{q,k,v}_proj``,
``attention.o_proj``, ``mlp.fc1`` and ``mlp.fc2``, the names listed here (the older names are
listed too, for models that keep them). After the blocks, ``layernorm`` normalises the hidden
states; ``ViTForImageClassification`` applies its ``classifier`` to the first (class) token.

:func:`vit_features` gives what a head reads: ``cls`` (that class token) or ``mean_patch``
(the mean of the patch tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.models.adapter import BlockAdapter, Stage, register_adapter
from epmq.models.folder import from_folder, read_config

_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.o_proj",),
    ("attention.output.dense",),
    ("mlp.fc1",),
    ("intermediate.dense",),
    ("mlp.fc2",),
    ("output.dense",),
)

#: a fine-tuned image classifier: ``vit.*`` (the encoder) and ``classifier.*`` (the head)
IMAGE_CLASSIFIER = "ViTForImageClassification"
#: what a linear head on a ViT reads: the class token or the mean of the patch tokens of the
#: final (layer-normalised) hidden states
FEATURE_KINDS = ("cls", "mean_patch")


@register_adapter
class VitAdapter(BlockAdapter):
    """Adapter for ViT encoders (one stage: the encoder's layer list)."""

    family = "vit"
    model_types = ("vit",)
    tasks = "epmq.heads.vit:VitTasks"
    sequential_groups = _GROUPS
    input_producers: ClassVar[Mapping[str, str]] = {
        "attention.q_proj": "layernorm_before",
        "attention.k_proj": "layernorm_before",
        "attention.v_proj": "layernorm_before",
        "attention.o_proj": "attention.v_proj",
        "mlp.fc1": "layernorm_after",
    }
    norm_sites = (("layernorm_before", None), ("layernorm_after", "attention.o_proj"))

    def stages(self, model: nn.Module) -> list[Stage]:
        paths = ("layers", "vit.layers", "encoder.layer", "vit.encoder.layer")
        return [self.find_stage(model, "encoder", paths)]

    @staticmethod
    def load(path: str | Path, **kwargs: Any) -> nn.Module:
        """:func:`load_vit`."""
        return load_vit(path, **kwargs)


def load_vit(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a ViT from a local folder (no hub access), in eval mode: the class named in
    ``architectures`` (``ViTForImageClassification``), else ``ViTModel`` (with its pooler
    only when the checkpoint has one)."""
    import transformers

    path = Path(path)
    config = read_config(path)
    if config.get("model_type") != "vit":
        raise EpmqError(
            f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not a ViT "
            "(expected 'vit')"
        )
    if IMAGE_CLASSIFIER in (config.get("architectures") or []):
        model = from_folder(transformers.ViTForImageClassification, path, **kwargs)
    else:
        model = from_folder(transformers.ViTModel, path, optional=("pooler",), **kwargs)
    return model.eval()


def vision_encoder(model: nn.Module) -> nn.Module:
    """The ``ViTModel`` inside ``model`` (a classifier's ``vit``, or the model itself)."""
    encoder = getattr(model, "vit", None)
    return encoder if isinstance(encoder, nn.Module) else model


@torch.no_grad()
def vit_features(model: nn.Module, pixel_values: Tensor, reads: str = "cls") -> Tensor:
    """Features ``[batch, hidden]`` of a ViT of kind ``reads`` (:data:`FEATURE_KINDS`): the
    class token of the final hidden states (what ``ViTForImageClassification`` reads) or the
    mean of the patch tokens."""
    if reads not in FEATURE_KINDS:
        raise EpmqError(f"unknown ViT feature {reads!r} (known: {', '.join(FEATURE_KINDS)})")
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    hidden = vision_encoder(model)(pixel_values=pixel_values).last_hidden_state
    return hidden[:, 0] if reads == "cls" else hidden[:, 1:].mean(dim=1)
