"""T5 / FLAN-T5 (answers scored against label words) and Llama-style causal LMs (answers scored
as continuations): classification without a head file.

Every input text is placed into the task's ``prompt`` (a template with ``{text}``). A class is
named by its label word (``label_words``, else the class name). T5 predicts the label word whose
tokens are most likely as the decoder's output; a causal LM predicts the label word whose
tokens are the most likely continuation of the prompt (after a space). Calibration examples
are teacher-forced with their own label word, so the decoder sees what it produces.

Default prompts: T5 ``"{text}"``; causal LMs ``"{text}\\nAnswer:"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from epmq.calib.text_data import calibration_batches, load_tokenizer
from epmq.data import Examples, TaskData
from epmq.errors import EpmqError
from epmq.heads.base import (
    Batch,
    ExpertFields,
    FamilyTasks,
    HeadOptions,
    TaskFields,
    chunks,
    label_words,
    prompts,
    require_text,
)
from epmq.models.adapter import BlockAdapter


class LabelWords:
    """A text-to-text task's "head": the words that name its classes."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def __repr__(self) -> str:
        return f"LabelWords({self.words!r})"


class _WordTasks(FamilyTasks):
    default_prompt = "{text}"

    def __init__(self, adapter: type[BlockAdapter], base_dir: Path, options: HeadOptions) -> None:
        super().__init__(adapter, base_dir, options)
        self.tokenizer = load_tokenizer(base_dir)

    def head(self, task: TaskFields, data: TaskData, expert: ExpertFields) -> LabelWords:
        require_text(task, data, self.family)
        if expert.head is not None:
            raise EpmqError(
                f"expert {expert.name}: {self.family} tasks are scored by label words, not a head "
                "file; remove 'head' and set the task's 'label_words' if the classes need names"
            )
        words = label_words(task, data)
        self.check_labels(task, data, len(words), f"the label words {words}")
        return LabelWords(words)


class T5Tasks(_WordTasks):
    """T5 / FLAN-T5: the encoder reads the prompt, the decoder is scored on label words."""

    def calibration_batches(
        self, task: TaskFields, head: Any, examples: Examples, batch_size: int
    ) -> list[Batch]:
        words = head.words
        texts = prompts(task, list(examples.inputs), self.default_prompt)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        batches = []
        for part in chunks(order, batch_size):
            enc = self.tokenizer(
                [texts[i] for i in part],
                truncation=True,
                max_length=task.max_length,
                padding=True,
                return_tensors="pt",
            )
            answers = self.tokenizer(
                [words[examples.labels[i]] for i in part], padding=True, return_tensors="pt"
            )
            labels = answers["input_ids"].masked_fill(answers["attention_mask"] == 0, -100)
            batches.append(
                {
                    "input_ids": enc["input_ids"],
                    "attention_mask": enc["attention_mask"],
                    "labels": labels,
                }
            )
        return batches

    def predict(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> Tensor:
        from epmq.models.t5 import score_label_words

        texts = prompts(task, list(examples.inputs), self.default_prompt)
        return score_label_words(model, self.tokenizer, texts, head.words, batch_size=batch_size)


class CausalLMTasks(_WordTasks):
    """Llama-style decoders: the label word is scored as the prompt's continuation."""

    default_prompt = "{text}\nAnswer:"

    def calibration_batches(
        self, task: TaskFields, head: Any, examples: Examples, batch_size: int
    ) -> list[Batch]:
        words = head.words
        texts = prompts(task, list(examples.inputs), self.default_prompt)
        full = [
            f"{text} {words[label]}" for text, label in zip(texts, examples.labels, strict=True)
        ]
        return calibration_batches(
            self.tokenizer,
            full,
            batch_size=batch_size,
            max_length=task.max_length,
            input_names=["input_ids", "attention_mask"],
        )

    def predict(
        self, model: nn.Module, head: Any, task: TaskFields, examples: Examples, batch_size: int
    ) -> Tensor:
        from epmq.models.llama import score_continuations

        texts = prompts(task, list(examples.inputs), self.default_prompt)
        return score_continuations(model, self.tokenizer, texts, [f" {w}" for w in head.words])
