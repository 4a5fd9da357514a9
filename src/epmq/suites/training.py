"""Training the suite models: fine-tuned experts and linear probes on the frozen base.

* Expert: the whole encoder except the embeddings is fine-tuned with a fresh linear head
  (AdamW, linear warm-up then linear decay, dropout on, seeded, length-bucketed batches).
* Probe: logistic regression on mean-pooled features of the frozen pretrained encoder
  (features computed once, standardised; the standardisation is folded back into the head).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from epmq.suites.batching import encode, length_sorted_batches, training_batches
from epmq.suites.classifier import pooled_features
from epmq.suites.task import Task, derived_seed


@dataclass(frozen=True)
class ExpertConfig:
    """Optimisation settings of one expert."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the pretrained linear probe."""

    steps: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-4
    seed: int = 0


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_expert(
    encoder: Any,
    task: Task,
    tokenizer: Any,
    config: ExpertConfig,
    *,
    on_step: Callable[[float], None] | None = None,
) -> tuple[Any, nn.Linear, dict[str, Any]]:
    """Fine-tune ``encoder`` (modified in place) with a new head on ``task.train``.

    Returns the encoder (eval mode), the head and a training record (seconds, losses).
    ``on_step(loss)`` is called after every step (progress bars).
    """
    seed = derived_seed(config.seed, "expert", task.name)
    torch.manual_seed(seed)
    hidden = encoder.config.hidden_size
    head = nn.Linear(hidden, task.num_classes)
    for param in encoder.embeddings.parameters():
        param.requires_grad_(False)
    decay, no_decay = [], []
    for param in encoder.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": no_decay, "lr": config.lr, "weight_decay": 0.0},
            {"params": list(head.parameters()), "lr": config.head_lr, "weight_decay": 0.0},
        ]
    )
    warmup = max(1, round(config.warmup * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _schedule(step, config.steps, warmup)
    )
    encoded = encode(
        tokenizer,
        task.train.texts,
        max_length=task.max_length,
        truncation_side=task.truncation_side,
    )
    batches = training_batches(
        encoded, task.train.labels, config.batch_size, tokenizer.pad_token_id, seed=seed
    )
    loss_fn = nn.CrossEntropyLoss()
    encoder.train()
    losses = []
    start = time.perf_counter()
    for _ in range(config.steps):
        batch, labels = next(batches)
        loss = loss_fn(head(pooled_features(encoder, batch)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(losses[-1])
    seconds = time.perf_counter() - start
    for param in encoder.parameters():
        param.requires_grad_(True)
    tail = losses[-max(1, len(losses) // 10) :]
    record = {
        "train_seconds": round(seconds, 2),
        "steps": config.steps,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "train_examples": len(task.train.texts),
    }
    return encoder.eval(), head.eval(), record


@torch.inference_mode()
def encode_features(
    encoder: Any,
    tokenizer: Any,
    task: Task,
    split: str = "train",
    batch_size: int = 128,
    limit: int | None = None,
) -> torch.Tensor:
    """Mean-pooled encoder features of a split (its first ``limit`` texts): [n, hidden]."""
    texts = task.split(split).texts[:limit]
    encoded = encode(
        tokenizer, texts, max_length=task.max_length, truncation_side=task.truncation_side
    )
    encoder.eval()
    out = torch.empty(len(texts), encoder.config.hidden_size)
    for index, batch in length_sorted_batches(encoded, batch_size, tokenizer.pad_token_id):
        out[index] = pooled_features(encoder, batch).float().cpu()
    return out


def train_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: ProbeConfig
) -> nn.Linear:
    """Multinomial logistic regression (full-batch Adam) on fixed features."""
    torch.manual_seed(config.seed)
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(config.steps):
        loss = loss_fn(head(x), labels) + config.weight_decay * head.weight.pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    # fold the standardisation into the head: W (x - m) / s + b = (W / s) x + (b - W m / s)
    folded = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - (head.weight / std) @ mean)
    return folded.eval()
