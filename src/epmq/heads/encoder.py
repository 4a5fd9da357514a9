"""BERT-style text encoders (BERT, MiniLM, RoBERTa, ...) with a linear head per task.

The encoder is loaded without its pooler (``AutoModel``, ``add_pooling_layer=False``) and is
what gets merged and quantized. Each expert folder holds its task's head,
``head.safetensors`` with ``weight`` ``[n_classes, hidden]`` and ``bias`` ``[n_classes]``
(or the file named by the expert's ``head`` field), applied to the pooled output: the mean of
the last hidden states over real tokens (``pooling: mean``, what the built-in suites train) or
the first token's state (``pooling: cls``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epmq.calib.text_data import calibration_batches, load_tokenizer, model_input_names
from epmq.data import Examples, TaskData
from epmq.devices import module_device
from epmq.errors import EpmqError
from epmq.heads.base import Batch, ExpertFields, FamilyTasks, HeadOptions, TaskFields, require_text
from epmq.models.adapter import BlockAdapter
from epmq.models.folder import check_vocabulary, read_config
from epmq.suites.batching import encode, length_sorted_batches
from epmq.suites.classifier import HEAD_FILE, load_head, mean_pool


def linear_head(expert: ExpertFields, width: int, width_name: str) -> nn.Linear:
    """The expert's head file (its ``head`` field, else ``<expert>/head.safetensors``),
    checked against the width of the features it reads."""
    file = Path(expert.head) if expert.head is not None else Path(expert.path) / HEAD_FILE
    if not file.is_file():
        raise EpmqError(
            f"expert {expert.name}: no head file {file} (a linear head with tensors 'weight' "
            "[n_classes, width] and 'bias' [n_classes]; name another file with 'head:')"
        )
    head = load_head(file.parent, file.name.removesuffix(".safetensors"))
    if head.in_features != width:
        raise EpmqError(
            f"expert {expert.name}: head {file} reads {head.in_features} features but the "
            f"model's {width_name} is {width}"
        )
    return head


class EncoderTasks(FamilyTasks):
    """Text classification with a BERT-style encoder and per-task linear heads."""

    modality = "text"

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        super().__init__(adapter, base_dir, options)
        self.tokenizer = load_tokenizer(base_dir)
        self.pooling = options.pooling

    def load_model(self, folder: Path) -> nn.Module:
        """The encoder without its pooler (the heads read the pooled hidden states)."""
        model = self.adapter.load(folder, add_pooling_layer=False)
        check_vocabulary(model, self.tokenizer, folder, self.base_dir)
        return model

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> nn.Linear:
        require_text(task, data, "BERT-style")
        hidden = int(read_config(self.base_dir).get("hidden_size", 0))
        head = linear_head(expert, hidden, "hidden size")
        self.check_labels(task, data, head.out_features, f"expert {expert.name}'s head")
        return head

    def calibration_batches(
        self, task: TaskFields, head: Any, examples: Examples, batch_size: int
    ) -> list[Batch]:
        return calibration_batches(
            self.tokenizer,
            list(examples.inputs),
            batch_size=batch_size,
            max_length=task.max_length,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
        )

    def features(self, encoder: nn.Module, batch: Batch) -> Tensor:
        """The pooled output the heads read: ``[batch, hidden]``."""
        names = model_input_names(encoder)
        device = module_device(encoder)
        inputs = {k: v.to(device) for k, v in batch.items() if names is None or k in names}
        hidden = encoder(**inputs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, batch["attention_mask"].to(device))

    def predict(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> Tensor:
        encoded = encode(self.tokenizer, list(examples.inputs), max_length=task.max_length)
        predicted = torch.empty(len(encoded), dtype=torch.long)
        pad = self.tokenizer.pad_token_id or 0
        for index, batch in length_sorted_batches(encoded, batch_size, pad):
            features = self.features(model, batch).to(module_device(head))
            predicted[index] = head(features.float()).argmax(-1).cpu()
        return predicted
