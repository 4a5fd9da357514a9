"""Tiny ``*ForSequenceClassification`` experts, fine-tuned in the test on a toy text task.

For each kind (``bert``, ``roberta``, ``electra``, ``distilbert``) :func:`build_kind` writes a
tiny pretrained base (random, built from a config), one expert per task fine-tuned from it
with ``AutoModelForSequenceClassification`` for a few steps on a separable toy task (a key
word decides the class) and saved with ``save_pretrained``, a word-level tokenizer beside
each, and the task data as jsonl. :func:`own_logits` is the experts' own evaluation, the
reference epmq must reproduce.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from family_folders import WORDS, word_tokenizer
from torch import nn

CLASSES = ("no", "yes")
KEYS = {"first": ("cat", "dog"), "second": ("sun", "moon")}  # task -> (class 0, class 1) words
NEUTRAL = [w for w in WORDS if w not in {k for pair in KEYS.values() for k in pair}]
N_TRAIN, N_CALIB, N_TEST = 32, 8, 24
SIZES = dict(hidden=32, layers=2, heads=2, ffn=64)


@dataclass
class TextProject:
    """What :func:`build_kind` wrote."""

    kind: str
    root: Path
    base: Path
    experts: dict[str, Path]
    data: dict[str, Path]
    splits: dict[str, dict[str, tuple[list[str], list[int]]]] = field(default_factory=dict)


def tokenizer() -> Any:
    return word_tokenizer(["[PAD]", "<unk>", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", pad_token="[PAD]")


def model_config(kind: str, vocab: int) -> Any:
    import transformers as tf

    h, n, a, f = SIZES["hidden"], SIZES["layers"], SIZES["heads"], SIZES["ffn"]
    common = dict(vocab_size=vocab, pad_token_id=0)
    if kind == "bert":
        return tf.BertConfig(**common, hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                             intermediate_size=f, max_position_embeddings=64)  # fmt: skip
    if kind == "roberta":
        return tf.RobertaConfig(**common, hidden_size=h, num_hidden_layers=n,
                                num_attention_heads=a, intermediate_size=f,
                                max_position_embeddings=66, type_vocab_size=1)  # fmt: skip
    if kind == "electra":  # embedding_size != hidden_size: embeddings_project is used
        return tf.ElectraConfig(**common, embedding_size=16, hidden_size=h, num_hidden_layers=n,
                                num_attention_heads=a, intermediate_size=f,
                                max_position_embeddings=64)  # fmt: skip
    if kind == "distilbert":
        return tf.DistilBertConfig(**common, dim=h, n_layers=n, n_heads=a, hidden_dim=f,
                                   max_position_embeddings=64)  # fmt: skip
    raise ValueError(kind)


def task_texts(task: str, seed: int, n: int) -> tuple[list[str], list[int]]:
    """``n`` texts of neutral words with one key word of ``task`` each; its class is the label."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), KEYS[task][label])
        texts.append(" ".join(words))
        labels.append(label)
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def model_inputs(model: nn.Module, tok: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tokenizer's outputs that ``model`` takes (DistilBERT: no ``token_type_ids``)."""
    import inspect

    enc = tok(list(texts), padding=True, return_tensors="pt")
    names = inspect.signature(model.forward).parameters
    return {k: v for k, v in enc.items() if k in names}


def fine_tune(model: nn.Module, tok: Any, texts: list[str], labels: list[int], steps: int) -> None:
    """``steps`` AdamW steps on batches of 8, on one thread (a tiny model's backward passes
    are many small ops: a second thread only waits, far slower on a busy machine)."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for step in range(steps):
            chunk = slice((step * 8) % len(texts), (step * 8) % len(texts) + 8)
            inputs = model_inputs(model, tok, texts[chunk])
            loss = model(**inputs, labels=torch.tensor(labels[chunk])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def own_logits(expert: Path, texts: Sequence[str]) -> torch.Tensor:
    """``AutoModelForSequenceClassification.from_pretrained(expert)(**inputs).logits``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(expert)).eval()
    tok = AutoTokenizer.from_pretrained(str(expert))
    with torch.no_grad():
        return model(**model_inputs(model, tok, texts)).logits


def build_kind(
    root: Path, kind: str, tasks: Sequence[str] = tuple(KEYS), steps: int = 60
) -> TextProject:
    """Base, fine-tuned experts and jsonl data of ``kind`` under ``root``."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    tok = tokenizer()
    torch.manual_seed(0)
    project = TextProject(kind, root, root / "base", {}, {})
    AutoModel.from_config(model_config(kind, len(tok))).save_pretrained(project.base)
    tok.save_pretrained(project.base)
    for number, task in enumerate(tasks):
        texts, labels = task_texts(task, number, N_TRAIN + N_CALIB + N_TEST)
        torch.manual_seed(number)
        expert = AutoModelForSequenceClassification.from_pretrained(
            str(project.base), num_labels=len(CLASSES)
        )
        fine_tune(expert, tok, texts[:N_TRAIN], labels[:N_TRAIN], steps)
        folder = root / f"expert_{task}"
        expert.save_pretrained(folder)
        tok.save_pretrained(folder)
        project.experts[task] = folder
        a, b = N_TRAIN, N_TRAIN + N_CALIB
        project.splits[task] = {
            "train": (texts[:a], labels[:a]),
            "calib": (texts[a:b], labels[a:b]),
            "test": (texts[b:], labels[b:]),
        }
        data = root / "data" / task
        data.mkdir(parents=True)
        for split, (xs, ys) in project.splits[task].items():
            rows = "".join(
                json.dumps({"text": x, "label": y}) + "\n" for x, y in zip(xs, ys, strict=True)
            )
            (data / f"{split}.jsonl").write_text(rows)
        project.data[task] = data
    return project


def config_for(project: TextProject, out: Path, **overrides: Any) -> dict[str, Any]:
    """An ``epmq run`` config of ``project`` (one merge, RTN 8-bit)."""
    config: dict[str, Any] = {
        "name": project.kind,
        "base": {"path": str(project.base)},
        "experts": [
            {"name": f"expert-{t}", "path": str(p), "task": t} for t, p in project.experts.items()
        ],
        "tasks": [
            {"name": t, "data": str(d), "format": "jsonl", "calib_size": N_CALIB}
            for t, d in project.data.items()
        ],
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["rtn"], "bits": [8]},
        "calibration": {"batch_size": 4},
        "output": {"dir": str(out)},
    }
    config.update(overrides)
    return config
