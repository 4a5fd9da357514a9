"""BERT-style encoders: BertModel, BertFor*, RoBERTa, XLM-RoBERTa, CamemBERT, MiniLM, ELECTRA
(``encoder.layer.N``; ELECTRA's layers are BERT layers, and its ``embeddings_project``, present
when ``embedding_size`` differs from ``hidden_size``, sits before the blocks: merged, not
quantized).

The blocks are ``BertLayer``s called as ``layer(hidden_states, extended_attention_mask, ...)``
and returning the new hidden states; the extended attention mask is captured as the model
computes it. Linears per block, in true-sequential order: ``attention.self.{query,key,value}``,
``attention.output.dense``, (decoder cross-attention,) ``intermediate.dense``,
``output.dense``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from epmq.errors import EpmqError
from epmq.models.adapter import BlockAdapter, Stage, register_adapter
from epmq.models.folder import from_folder, read_config

_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.output.dense",),
    ("crossattention.self.query",),
    ("crossattention.self.key", "crossattention.self.value"),
    ("crossattention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)

#: model types whose base model has no pooler (and takes no ``add_pooling_layer``)
_POOLERLESS = ("electra",)

#: the task-head modules of a ``*ForSequenceClassification`` checkpoint, outside the base
#: model: read by the heads (epmq.heads.sequence_classification), left out of the backbone
SEQUENCE_CLASSIFIER_MODULES = ("classifier", "pre_classifier")

_HEADS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "masked-lm": "AutoModelForMaskedLM",
}


@register_adapter
class BertAdapter(BlockAdapter):
    """Adapter for BERT-like encoders (one stage: the encoder's layer list)."""

    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    tasks = "epmq.heads.encoder:EncoderTasks"
    sequential_groups = _GROUPS
    # post-norm: every LayerNorm output also feeds a residual, so only V -> output folds
    input_producers: ClassVar[Mapping[str, str]] = {
        "attention.output.dense": "attention.self.value",
        "crossattention.output.dense": "crossattention.self.value",
    }
    # post-norm: each sub-layer ends in its norm; output.LayerNorm feeds the next block
    norm_sites = (
        ("attention.output.LayerNorm", "attention.output.dense"),
        ("crossattention.output.LayerNorm", "crossattention.output.dense"),
        ("output.LayerNorm", "output.dense"),
    )

    @staticmethod
    def load(path: str | Path, **kwargs: Any) -> nn.Module:
        """:func:`load_bert`."""
        return load_bert(path, **kwargs)

    def stages(self, model: nn.Module) -> list[Stage]:
        return [self.find_stage(model, "encoder", self._candidate_paths(model))]

    @staticmethod
    def _candidate_paths(model: nn.Module) -> list[str]:
        prefix = getattr(model, "base_model_prefix", "") or ""
        paths = ["encoder.layer"]
        if prefix:
            paths.append(f"{prefix}.encoder.layer")
        return paths


def load_bert(path: str | Path, head: str = "base", **kwargs: Any) -> nn.Module:
    """Load a BERT-like model from a local Hugging Face folder (no hub access).

    ``head`` is one of ``base``, ``sequence-classification``, ``token-classification``,
    ``masked-lm``; extra keyword arguments (e.g. ``num_labels``) go to ``from_pretrained``.
    A compressed-tensors export loads dequantized (:func:`~epmq.models.folder.from_folder`).

    The ``base`` model has a pooler only when the checkpoint has one (a folder saved without
    it, as the suites' encoders and their exports are, loads without it: no random pooler);
    ``add_pooling_layer=False`` leaves a checkpoint's pooler out without a warning (ELECTRA has
    no pooler: the argument is dropped). The ``base`` model of a ``*ForSequenceClassification``
    checkpoint leaves its classifier out without a warning too (the heads read it). Every other
    tensor the model needs must be in the checkpoint.
    """
    import transformers

    path = Path(path)
    config = read_config(path)
    if head not in _HEADS:
        raise EpmqError(f"unknown BERT head {head!r}; choose one of {', '.join(_HEADS)}")
    if config.get("model_type") in _POOLERLESS:
        kwargs.pop("add_pooling_layer", None)
    optional = ("pooler",) if head == "base" else ()
    unused = SEQUENCE_CLASSIFIER_MODULES if head == "base" else ()
    if kwargs.get("add_pooling_layer") is False:
        unused = ("pooler", *unused)
    model = from_folder(
        getattr(transformers, _HEADS[head]), path, optional=optional, unused=unused, **kwargs
    )
    model.eval()
    return model
