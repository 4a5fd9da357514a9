"""DistilBERT encoders: DistilBertModel, DistilBertFor* (``transformer.layer.N``).

A DistilBERT block (``TransformerBlock``) is a post-norm BERT layer with other names, called as
``block(hidden_states, attention_mask, ...)`` and returning the new hidden states; the
attention mask is captured as the model computes it. Linears per block, in true-sequential
order: ``attention.{q_lin,k_lin,v_lin}``, ``attention.out_lin``, ``ffn.lin1``, ``ffn.lin2``.
DistilBERT has no pooler and no ``token_type_ids``; its task heads are BERT's
(:class:`epmq.heads.encoder.DistilBertTasks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from epmq.models.adapter import BlockAdapter, Stage, register_adapter
from epmq.models.bert import SEQUENCE_CLASSIFIER_MODULES
from epmq.models.folder import from_folder, read_config

_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    ("attention.out_lin",),
    ("ffn.lin1",),
    ("ffn.lin2",),
)


@register_adapter
class DistilBertAdapter(BlockAdapter):
    """Adapter for DistilBERT encoders (one stage: the transformer's layer list)."""

    family = "distilbert"
    model_types = ("distilbert",)
    tasks = "epmq.heads.encoder:DistilBertTasks"
    sequential_groups = _GROUPS
    # post-norm: sa_layer_norm's output also feeds the residual, so only V -> out_lin folds
    input_producers: ClassVar[Mapping[str, str]] = {"attention.out_lin": "attention.v_lin"}
    # post-norm: each sub-layer ends in its norm; output_layer_norm feeds the next block
    norm_sites = (
        ("sa_layer_norm", "attention.out_lin"),
        ("output_layer_norm", "ffn.lin2"),
    )

    @staticmethod
    def load(path: str | Path, **kwargs: Any) -> nn.Module:
        """:func:`load_distilbert`."""
        return load_distilbert(path, **kwargs)

    def stages(self, model: nn.Module) -> list[Stage]:
        prefix = getattr(model, "base_model_prefix", "") or ""
        paths = ["transformer.layer"] + ([f"{prefix}.transformer.layer"] if prefix else [])
        return [self.find_stage(model, "encoder", paths)]


def load_distilbert(path: str | Path, **kwargs: Any) -> nn.Module:
    """The ``DistilBertModel`` saved in the local folder ``path`` (eval mode, no hub access).

    A ``*ForSequenceClassification`` checkpoint loads its backbone (the ``distilbert.``
    prefix stripped) and leaves its ``pre_classifier`` / ``classifier`` out without a warning:
    the heads read them. ``add_pooling_layer`` (what the BERT loader takes) is dropped:
    DistilBERT has no pooler. Other keyword arguments go to ``from_pretrained``; every tensor
    the model needs must be in the checkpoint.
    """
    import transformers

    read_config(path)  # a folder without config.json is one line naming it
    kwargs.pop("add_pooling_layer", None)
    model = from_folder(
        transformers.AutoModel, Path(path), unused=SEQUENCE_CLASSIFIER_MODULES, **kwargs
    )
    model.eval()
    return model
