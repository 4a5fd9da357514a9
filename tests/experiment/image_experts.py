"""Shared pieces of the image-expert tests: tiny CLIP settings, toy tasks, a few training
steps, the merges computed by hand and the user's own evaluation loop (plain torch)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from family_folders import CLASSES, Family, pixel_values, write_data
from torch import nn

from epmq.experiment.config import parse_config
from epmq.experiment.session import run_session

TASKS = ("first", "second")
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8,
)  # fmt: skip
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    vocab_size=40, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
)  # fmt: skip
N_TRAIN, N_CALIB, N_TEST = 32, 8, 32
MERGES = {"task_arithmetic": 0.5, "average": None}  # merge method -> task arithmetic's scale

StateDict = Mapping[str, torch.Tensor]


def preprocessor(mean: list[float], std: list[float]) -> dict[str, Any]:
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }


def write_base(folder: Path, model: nn.Module, mean: list[float], std: list[float]) -> None:
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor(mean, std)))


def colour_labels(inputs: np.ndarray, task: int) -> np.ndarray:
    """The toy tasks: the strongest colour channel (task 0), the weakest (task 1)."""
    means = inputs.reshape(len(inputs), -1, 3).mean(1)
    return means.argmax(1) if task == 0 else means.argmin(1)


def splits(inputs: np.ndarray, labels: np.ndarray) -> dict[str, tuple[list[Any], list[int]]]:
    a, b = N_TRAIN, N_TRAIN + N_CALIB
    cut = {"train": slice(0, a), "calib": slice(a, b), "test": slice(b, None)}
    return {k: (list(inputs[s]), [int(v) for v in labels[s]]) for k, s in cut.items()}


def perturb(model: nn.Module, seed: int) -> None:
    """The expert's own fine-tuning, in short: its encoder blocks moved off the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))


def train_linear(features: torch.Tensor, labels: list[int], seed: int) -> nn.Linear:
    """A linear head fitted for a few steps (full batch, Adam) on ``features``."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], len(CLASSES))
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05)
    target = torch.tensor(labels)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(head(features), target).backward()
        optimiser.step()
    return head.eval()


def fine_tune(expert: nn.Module, train: tuple[list[Any], list[int]]) -> torch.Tensor:
    """A few Adam steps of an ``*ForImageClassification`` ``expert`` on ``train`` (its loss
    from ``labels``); returns the training pixels (eval mode after)."""
    pixels, target = pixel_values(np.stack(train[0])), torch.tensor(train[1])
    optimiser = torch.optim.Adam(expert.parameters(), lr=3e-3)
    expert.train()
    for _ in range(8):
        optimiser.zero_grad()
        expert(pixel_values=pixels, labels=target).loss.backward()
        optimiser.step()
    expert.eval()
    return pixels


def merged_states(base: StateDict, experts: list[StateDict]) -> dict[str, StateDict]:
    """The merges of the config, computed here: W0 + s Σ (Wi - W0), and the mean of the Wi."""
    out: dict[str, StateDict] = {}
    for method, scale in MERGES.items():
        merged = {}
        for name, w0 in base.items():
            stack = torch.stack([e[name].float() for e in experts])
            if scale is None:
                merged[name] = stack.mean(0)
            else:
                merged[name] = w0 + scale * (stack - w0).sum(0)
        out[method] = merged
    return out


def accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    split: tuple[list, list],
    pixels: Callable[[np.ndarray], torch.Tensor] = pixel_values,
) -> float:
    """The user's own accuracy: ``predict`` (pixel values to logits) on ``split``."""
    inputs, labels = split
    with torch.no_grad():
        predicted = predict(pixels(np.stack(inputs)))
    return int((predicted.argmax(-1) == torch.tensor(labels)).sum()) / len(labels)


def run_config(
    family: Family, root: Path, formats: tuple[str, ...] = ("npz", "npz"), **overrides: Any
) -> dict[str, Any]:
    """A user's config for ``family``: each task's data written in its format (``formats``,
    one per task), both merges, RTN 8-bit, the report under ``root``."""
    tasks = []
    for task, fmt in zip(TASKS, formats, strict=True):
        data = write_data(family, task, fmt, root / "data" / task)
        tasks.append({"name": task, "data": str(data), "format": fmt,
                      "classes": list(CLASSES), "calib_size": N_CALIB})  # fmt: skip
    config = {
        "name": "images",
        "base": {"path": str(family.base)},
        "experts": [
            {"name": f"expert-{t}", "path": str(family.experts[t]), "task": t} for t in TASKS
        ],
        "tasks": tasks,
        "merges": [
            {"method": m, "params": {} if s is None else {"scale": s}} for m, s in MERGES.items()
        ],
        "quantization": {"methods": ["rtn"], "bits": [8]},
        "calibration": {"batch_size": 8},
        "output": {"dir": str(root / "report")},
    }
    config.update(overrides)
    return config


def held_out(family: Family, task: str) -> tuple[list, list]:
    return family.splits[task]["test"]


def run(config: dict[str, Any]) -> Any:
    results, _ = run_session(parse_config(config), progress=False, announce=lambda _: None)
    return results
