"""Task heads of text encoders: the head inside a ``*ForSequenceClassification`` checkpoint,
and a linear head file with what it reads (``head_input``).

An expert fine-tuned with ``AutoModelForSequenceClassification`` keeps its classifier inside
its checkpoint, beside the backbone. The backbone is what is merged and quantized (the family
loader strips the ``bert.`` / ``roberta.`` / ``electra.`` / ``distilbert.`` prefix and leaves
the classifier out); the head modules are kept per task, never merged, and applied exactly as
the architecture's own forward applies them, with transformers' own modules:

- BERT: the pooler (dense + tanh on token 0), dropout, ``classifier`` (a linear);
- RoBERTa / XLM-R / CamemBERT: ``classifier`` (dense, tanh, ``out_proj`` on token 0);
  ELECTRA: ``classifier`` (dense, gelu, ``out_proj`` on token 0) — one module each that
  reads the last hidden states;
- DistilBERT: ``pre_classifier`` on token 0, ReLU, dropout, ``classifier``.

The pooler counts as head (one per task). With ``merge_pooler`` the backbone is loaded with
its pooler, which is merged with the experts' poolers, and each BERT head reads the merged
pooler's output instead of its own.

Every head here maps the backbone's output (``last_hidden_state``, ``pooler_output`` when the
backbone has a pooler) and the attention mask to class logits: :meth:`EncoderHead.logits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.models.folder import from_folder, read_config
from epmq.suites.classifier import mean_pool


def is_sequence_classifier(folder: Path) -> bool:
    """Whether ``folder/config.json``'s ``architectures`` names a ``*ForSequenceClassification``."""
    names = read_config(folder).get("architectures") or []
    return any(str(name).endswith("ForSequenceClassification") for name in names)


def has_pooler(folder: Path) -> bool:
    """Whether the checkpoint in ``folder`` holds a BERT pooler (``[<prefix>.]pooler.*``)."""
    from epmq.merging.checkpoint import CheckpointReader

    names = CheckpointReader(folder).meta
    return any(n == "pooler.dense.weight" or n.endswith(".pooler.dense.weight") for n in names)


class EncoderHead(Protocol):
    """A task head on a text encoder's output (what :class:`EncoderTasks` calls)."""

    @property
    def out_features(self) -> int: ...
    @property
    def reads_pooler(self) -> bool: ...

    def logits(self, outputs: Any, attention_mask: Tensor) -> Tensor:
        """Class scores ``[batch, classes]`` from the backbone's ``outputs`` (float32)."""
        ...


def pooler_output(outputs: Any, pooler: nn.Module | None, what: str) -> Tensor:
    """The pooled first token: ``pooler`` on the last hidden states when the head holds its
    own pooler, else the backbone's ``pooler_output`` (a merged pooler, ``merge_pooler``)."""
    hidden = outputs.last_hidden_state
    if pooler is not None:
        return pooler(hidden.to(_device(pooler), torch.float32))
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        raise EpmqError(
            f"merge_pooler: {what} reads the merged pooler, but the model evaluated has no "
            "pooler (its checkpoint holds none); set merge_pooler: false"
        )
    return pooled.float()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class CheckpointHead(nn.Module):
    """The head modules of a ``*ForSequenceClassification`` checkpoint (see the module
    docstring), taken from the expert's own task model so that the math is transformers'."""

    def __init__(
        self,
        where: str,
        classifier: nn.Module,
        *,
        pooler: nn.Module | None = None,
        reads_pooler: bool = False,
        pre_classifier: nn.Module | None = None,
        dropout: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.where = where
        self.classifier = classifier
        self.pooler = pooler
        self.reads_pooler = reads_pooler
        self.pre_classifier = pre_classifier
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.out_features = int(_last_linear(classifier).out_features)
        self.eval()

    @classmethod
    def load(cls, folder: Path, where: str, *, merge_pooler: bool) -> CheckpointHead:
        """Load the task model in ``folder`` once and keep its head modules (and, for BERT,
        its pooler unless ``merge_pooler``)."""
        import transformers

        task_model = from_folder(transformers.AutoModelForSequenceClassification, folder)
        classifier = getattr(task_model, "classifier", None)
        if not isinstance(classifier, nn.Module):
            raise EpmqError(
                f"{where}: {type(task_model).__name__} in {folder} has no 'classifier' "
                "module; save a head.safetensors beside the expert instead"
            )
        dropout = getattr(task_model, "dropout", None)
        pre_classifier = getattr(task_model, "pre_classifier", None)
        if isinstance(pre_classifier, nn.Module):  # DistilBERT
            return cls(where, classifier, pre_classifier=pre_classifier, dropout=dropout)
        if isinstance(classifier, nn.Linear):  # BERT: the classifier reads the pooler output
            pooler = getattr(task_model.base_model, "pooler", None)
            if pooler is None:
                raise EpmqError(
                    f"{where}: {type(task_model).__name__} in {folder} has no pooler for its "
                    "classifier to read"
                )
            kept = None if merge_pooler else pooler
            return cls(where, classifier, pooler=kept, reads_pooler=True, dropout=dropout)
        return cls(where, classifier)  # RoBERTa, ELECTRA: one module on the hidden states

    def logits(self, outputs: Any, attention_mask: Tensor) -> Tensor:
        device = _device(self.classifier)
        if self.reads_pooler:
            pooled = pooler_output(outputs, self.pooler, self.where)
            return self.classifier(self.dropout(pooled.to(device)))
        hidden = outputs.last_hidden_state.to(device, torch.float32)
        if self.pre_classifier is not None:
            # DistilBERT: classifier(dropout(relu(pre_classifier(h[:, 0]))))
            pooled = torch.relu(self.pre_classifier(hidden[:, 0]))
            return self.classifier(self.dropout(pooled))
        return self.classifier(hidden)


def _last_linear(module: nn.Module) -> nn.Linear:
    """The module's last linear (the one that outputs the classes)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EpmqError(f"a classifier {type(module).__name__} without a linear layer")
    return linears[-1]


class FileHead(nn.Linear):
    """A linear head file and the features it reads (``head_input``): the mean of the last
    hidden states over real tokens (``mean``), the first token's state (``cls``), or the BERT
    pooler output (``pooler``: its own ``pooler`` module, or the merged one). Still the
    linear itself (``weight``, ``bias``), as exports write it."""

    def __init__(self, linear: nn.Linear, reads: str, pooler: nn.Module | None = None) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.reads = reads
        self.reads_pooler = reads == "pooler"
        self.pooler = pooler
        self.eval()

    def features(self, outputs: Any, attention_mask: Tensor) -> Tensor:
        """The ``[batch, hidden]`` features the linear reads."""
        if self.reads_pooler:
            return pooler_output(outputs, self.pooler, "a head_input 'pooler' head")
        hidden = outputs.last_hidden_state
        if self.reads == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, attention_mask.to(hidden.device))

    def logits(self, outputs: Any, attention_mask: Tensor) -> Tensor:
        features = self.features(outputs, attention_mask)
        return self(features.to(self.weight.device, torch.float32))
