"""BERT-style text encoders (BERT, MiniLM, RoBERTa, ELECTRA, DistilBERT, ...) with a head per
task.

The encoder is loaded without its pooler (``AutoModel``, ``add_pooling_layer=False``; with
``merge_pooler`` with it) and is what gets merged and quantized. Each expert's head is either

- a head file: ``head.safetensors`` with ``weight`` ``[n_classes, hidden]`` and ``bias``
  ``[n_classes]`` (or the file named by the expert's ``head`` field), applied to what the
  expert's ``head_input`` names (default: the experiment's ``pooling``): the mean of the last
  hidden states over real tokens (``mean``, what the built-in suites train), the first token's
  state (``cls``) or the BERT pooler output (``pooler``); or
- without a head file, the head inside a ``*ForSequenceClassification`` checkpoint, applied
  as its architecture does (:mod:`epmq.heads.sequence_classification`).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epmq.calib.text_data import calibration_batches, load_tokenizer, model_input_names
from epmq.data import Examples, TaskData
from epmq.devices import module_device
from epmq.errors import EpmqError
from epmq.heads.base import Batch, ExpertFields, FamilyTasks, HeadOptions, TaskFields, require_text
from epmq.heads.sequence_classification import (
    CheckpointHead,
    EncoderHead,
    FileHead,
    has_pooler,
    is_sequence_classifier,
)
from epmq.models.adapter import BlockAdapter
from epmq.models.folder import check_vocabulary, read_config
from epmq.suites.batching import encode, length_sorted_batches
from epmq.suites.classifier import HEAD_FILE, load_head


def head_file(expert: ExpertFields) -> Path:
    """The expert's head file: its ``head`` field, else ``<expert>/head.safetensors``."""
    return Path(expert.head) if expert.head is not None else Path(expert.path) / HEAD_FILE


def linear_head(expert: ExpertFields, width: int, width_name: str) -> nn.Linear:
    """The expert's head file (its ``head`` field, else ``<expert>/head.safetensors``),
    checked against the width of the features it reads."""
    file = head_file(expert)
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
    """Text classification with a BERT-style encoder and a head per task (see the module
    docstring)."""

    modality = "text"
    head_inputs = ("mean", "cls", "pooler")
    #: the tokenizer outputs the encoder takes
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        super().__init__(adapter, base_dir, options)
        self.tokenizer = load_tokenizer(base_dir)
        self.pooling = options.pooling

    def load_model(self, folder: Path) -> nn.Module:
        """The encoder, without its pooler unless ``merge_pooler`` (then the poolers are merged
        with it and the heads read the merged pooler's output)."""
        model = self.adapter.load(folder, add_pooling_layer=self.options.merge_pooler)
        check_vocabulary(model, self.tokenizer, folder, self.base_dir)
        return model

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> EncoderHead:
        require_text(task, data, f"{self.family} encoder")
        where = f"expert {expert.name}"
        self.check_architecture(expert)
        head: CheckpointHead | FileHead
        file = head_file(expert)
        if file.is_file():
            reads = self.head_input(expert)
            linear = linear_head(expert, self.hidden_size(), "hidden size")
            needs_pooler = reads == "pooler" and not self.options.merge_pooler
            head = FileHead(linear, reads, self.pooler(expert) if needs_pooler else None)
        elif is_sequence_classifier(Path(expert.path)):
            if expert.head_input is not None:
                raise EpmqError(
                    f"{where}: head_input {expert.head_input!r} applies to a head file, but "
                    f"{expert.path} has none: its *ForSequenceClassification head reads what its "
                    "architecture reads; remove head_input"
                )
            merge_pooler = self.options.merge_pooler
            head = CheckpointHead.load(Path(expert.path), where, merge_pooler=merge_pooler)
        else:
            raise EpmqError(
                f"{where}: no head file {file}, and {Path(expert.path) / 'config.json'} names no "
                "*ForSequenceClassification architecture whose head epmq could read; save the "
                "expert with AutoModelForSequenceClassification, or a linear head ('weight' "
                "[n_classes, hidden], 'bias' [n_classes]) as head.safetensors or 'head:'"
            )
        if self.options.merge_pooler:
            self.check_merged_pooler(expert, head)
        self.check_labels(task, data, head.out_features, f"{where}'s head")
        return head

    @cached_property
    def base_has_pooler(self) -> bool:
        return has_pooler(self.base_dir)

    def check_merged_pooler(self, expert: ExpertFields, head: EncoderHead) -> None:
        """With ``merge_pooler``, the base and every expert hold a pooler (or none do: then
        no head may read one), so that the poolers merge like every other tensor."""
        own = has_pooler(Path(expert.path))
        if own != self.base_has_pooler:
            holder, lacker = (expert.path, self.base_dir) if own else (self.base_dir, expert.path)
            raise EpmqError(
                f"merge_pooler: {holder} holds a pooler but {lacker} does not (expert "
                f"{expert.name}), so the poolers cannot be merged; set merge_pooler: false"
            )
        if head.reads_pooler and not own:
            raise EpmqError(
                f"merge_pooler: expert {expert.name}'s head reads the merged pooler, but neither "
                f"{expert.path} nor the base {self.base_dir} holds one; set merge_pooler: false"
            )

    def check_architecture(self, expert: ExpertFields) -> None:
        """The expert's backbone is the base's architecture (``model_type``): another one
        (a DistilBERT expert of a BERT base) has other tensors and cannot be merged with it."""
        base_type = read_config(self.base_dir).get("model_type")
        own_type = read_config(expert.path).get("model_type")
        if own_type != base_type:
            raise EpmqError(
                f"expert {expert.name}: {Path(expert.path) / 'config.json'} holds a "
                f"{own_type!r} model but the base {self.base_dir} is {base_type!r}; every expert "
                "must be fine-tuned from the base"
            )

    def head_input(self, expert: ExpertFields) -> str:
        """What the expert's head file reads: its ``head_input``, else the ``pooling``."""
        reads = expert.head_input if expert.head_input is not None else self.pooling
        if reads not in self.head_inputs:
            raise EpmqError(
                f"expert {expert.name}: head_input {reads!r} is not one of "
                f"{', '.join(self.head_inputs)} (what a {self.family} head file reads)"
            )
        return reads

    def hidden_size(self) -> int:
        """The encoder's width (``hidden_size``; DistilBERT's config calls it ``dim``)."""
        config = read_config(self.base_dir)
        return int(config.get("hidden_size", config.get("dim", 0)))

    def pooler(self, expert: ExpertFields) -> nn.Module:
        """The BERT pooler a ``head_input: pooler`` head reads: the expert's own when its
        checkpoint holds one, else the base's."""
        for folder in (Path(expert.path), self.base_dir):
            if has_pooler(folder):
                return self.adapter.load(folder).pooler.float().eval()
        raise EpmqError(
            f"expert {expert.name}: head_input 'pooler' reads a BERT pooler, but neither "
            f"{expert.path} nor the base {self.base_dir} holds one; use mean or cls"
        )

    def calibration_batches(
        self, task: TaskFields, head: Any, examples: Examples, batch_size: int
    ) -> list[Batch]:
        return calibration_batches(
            self.tokenizer,
            list(examples.inputs),
            batch_size=batch_size,
            max_length=task.max_length,
            input_names=list(self.input_names),
        )

    def outputs(self, encoder: nn.Module, batch: Batch) -> Any:
        """The encoder's output on ``batch`` (``last_hidden_state``, and ``pooler_output``
        when it has a pooler)."""
        names = model_input_names(encoder)
        device = module_device(encoder)
        inputs = {k: v.to(device) for k, v in batch.items() if names is None or k in names}
        return encoder(**inputs)

    def predict(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> Tensor:
        encoded = encode(self.tokenizer, list(examples.inputs), max_length=task.max_length)
        predicted = torch.empty(len(encoded), dtype=torch.long)
        pad = self.tokenizer.pad_token_id or 0
        for index, batch in length_sorted_batches(encoded, batch_size, pad):
            outputs = self.outputs(model, batch)
            predicted[index] = head.logits(outputs, batch["attention_mask"]).argmax(-1).cpu()
        return predicted


class DistilBertTasks(EncoderTasks):
    """DistilBERT: BERT's heads on an encoder that takes no ``token_type_ids``."""

    input_names = ("input_ids", "attention_mask")
