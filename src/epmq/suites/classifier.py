"""The pooled task classifier and the on-disk expert format.

A task classifier is a Hugging Face ``BertModel`` encoder, mean pooling over the non-padding
tokens, and a per-task ``nn.Linear(hidden, n_classes)`` head. Only the encoder is merged and
quantized; heads stay per task.

Expert folder (what :meth:`Suite.prepare` writes and what users bring)::

    <expert>/config.json, model.safetensors    # BertModel.save_pretrained (no pooler)
    <expert>/head.safetensors                  # "weight" [n_classes, hidden], "bias" [n_classes]
    <expert>/tokenizer.json, vocab.txt, ...    # tokenizer files
    <expert>/epmq_expert.json                  # task, classes, training record (optional)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epmq.atomic import save_tensors, write_json
from epmq.errors import EpmqError
from epmq.models.folder import from_folder, quiet_transformers

HEAD_FILE = "head.safetensors"
INFO_FILE = "epmq_expert.json"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``attention_mask`` is 1: [batch, hidden]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pooled_features(encoder: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run the encoder on a tokenized batch and mean-pool its last hidden states."""
    device = next(encoder.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    hidden = encoder(**inputs).last_hidden_state
    return mean_pool(hidden, inputs["attention_mask"])


class PooledClassifier(nn.Module):
    """encoder -> mean pooling over real tokens -> linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return self.head(pooled_features(self.encoder, batch))


def load_encoder(path: str | Path) -> Any:
    """Load a ``BertModel`` (without pooler) from a Hugging Face folder, in eval mode.

    The folder may be an expert, a merge or a quantized export: a compressed-tensors folder
    loads with its weights dequantized; a ``gptq`` one is refused (it needs a GPTQ runtime),
    see :func:`epmq.models.folder.quantization_kwargs`.
    """
    from transformers import BertModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise EpmqError(f"{path}: not a Hugging Face model folder (no config.json)")
    model = from_folder(BertModel, path, unused=("pooler",), add_pooling_layer=False)
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    """Load the (fast) tokenizer stored in a model or expert folder."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise EpmqError(f"{path}: no tokenizer files (tokenizer.json or vocab.txt)")
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


def load_head(expert_dir: str | Path, name: str = "head") -> nn.Linear:
    """The linear head in ``<expert_dir>/<name>.safetensors`` (tensors weight, bias)."""
    from epmq.merging.checkpoint import open_safetensors

    file = Path(expert_dir) / f"{name}.safetensors"
    if not file.is_file():
        raise EpmqError(f"{file}: head file not found (expected tensors 'weight' and 'bias')")
    with open_safetensors(file) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    missing = {"weight", "bias"} - set(tensors)
    if missing:
        raise EpmqError(f"{file}: missing tensor(s) {sorted(missing)}")
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise EpmqError(
            f"{file}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not form a "
            "linear head [n_classes, hidden] + [n_classes]"
        )
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())
    return head.eval()


def head_tensors(head: nn.Linear) -> dict[str, torch.Tensor]:
    return {"weight": head.weight.detach().float(), "bias": head.bias.detach().float()}


def save_expert(
    folder: Path,
    encoder: Any,
    head: nn.Linear,
    tokenizer: Any,
    *,
    task: str,
    classes: Sequence[str],
    record: Mapping[str, Any] | None = None,
) -> None:
    """Write an expert into ``folder`` (normally the partial folder of ``atomic.output_dir``)."""
    with quiet_transformers():
        encoder.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    meta = {"task": task, "classes": json.dumps(list(classes))}
    save_tensors(folder / HEAD_FILE, head_tensors(head), metadata=meta)
    write_json(folder / INFO_FILE, {"task": task, "classes": list(classes), **(record or {})})


def read_expert_info(expert_dir: str | Path) -> dict[str, Any]:
    """The ``epmq_expert.json`` record of an expert folder ({} when absent)."""
    file = Path(expert_dir) / INFO_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise EpmqError(f"{file}: not valid JSON ({exc})") from None
