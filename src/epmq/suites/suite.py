"""A suite: a pretrained base, its tasks, and the experts and probes trained from them.

Trained models are cached under ``<cache root>/<suite name>/<key>``, where the key is a hash
of :attr:`Suite.settings` (data sizes, seed, optimisation settings, base model path, ...);
changing any setting gives a new key, and a second :meth:`Suite.prepare` with the same
settings only loads. Cache root: the ``cache_dir`` argument, else ``$EPMQ_CACHE/suites``, else
``~/.cache/epmq/suites``. Layout of one key folder::

    settings.json                 # the settings that made the key
    experts/<task>/               # one expert folder per task (see epmq.suites.classifier)
    probes/<task>.safetensors     # "weight" / "bias": linear probe on the pretrained encoder

The ``tasks`` setting (which tasks a suite holds) is not part of the key: every cached file
belongs to one task, so a suite restricted to some tasks shares its experts with the full one.

Every expert folder and the probe file are written atomically, so an interrupted run resumes
from the experts already finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from epmq.atomic import output_dir, save_tensors, write_json
from epmq.errors import EpmqError
from epmq.models.folder import check_vocabulary
from epmq.suites import classifier
from epmq.suites.batching import encode, length_sorted_batches
from epmq.suites.task import Task
from epmq.suites.training import (
    ExpertConfig,
    ProbeConfig,
    encode_features,
    train_expert,
    train_probe,
)

UNKEYED_SETTINGS = ("tasks",)
# Settings every trainable suite has; suites add their own (data sizes, model, ...).
TRAINING_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "steps": 200,
    "batch_size": 16,
    "lr": 1e-4,
    "head_lr": 2e-3,
    "weight_decay": 0.01,
    "warmup": 0.1,
    "probe_steps": 300,
    "probe_lr": 0.05,
    "probe_weight_decay": 1e-4,
    "probe_examples": 1000,  # train examples the probe features are computed on
}


def default_cache_root() -> Path:
    """``$EPMQ_CACHE/suites`` when set, else ``~/.cache/epmq/suites``."""
    env = os.environ.get("EPMQ_CACHE")
    return Path(env).expanduser() / "suites" if env else Path.home() / ".cache/epmq/suites"


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the settings (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def apply_overrides(settings: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with ``overrides`` applied; unknown keys and wrong types are user errors."""
    fixed = {"suite", "format"}
    out = dict(settings)
    for key, value in overrides.items():
        if key not in settings or key in fixed:
            allowed = sorted(set(settings) - fixed)
            raise EpmqError(f"unknown suite setting {key!r}; settings are {allowed}")
        default = settings[key]
        if isinstance(default, bool) or not isinstance(default, int | float | str):
            out[key] = value
        elif isinstance(default, float) and isinstance(value, int | float):
            out[key] = float(value)
        elif not isinstance(value, type(default)) or isinstance(value, bool):
            raise EpmqError(
                f"suite setting {key!r} must be {type(default).__name__}, got {value!r}"
            )
        else:
            out[key] = value
    return out


@dataclass
class SuiteModels:
    """What :meth:`Suite.prepare` returns: expert folders and pretrained probe heads."""

    base_dir: Path
    cache_dir: Path
    expert_dirs: dict[str, Path]
    probe_heads: dict[str, nn.Linear]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)


class Suite:
    """Tasks + a pretrained base + cached experts and probes (see the module docstring)."""

    def __init__(
        self,
        name: str,
        settings: Mapping[str, Any],
        *,
        build_tasks: Callable[[Mapping[str, Any]], list[Task]],
        base_dir: Callable[[], Path],
        cache_root: Path | None = None,
    ) -> None:
        self.name = name
        self._settings = dict(settings)
        self._build_tasks = build_tasks
        self._base_dir = base_dir
        self.cache_root = Path(cache_root).expanduser() if cache_root else default_cache_root()

    def __repr__(self) -> str:
        return f"Suite({self.name!r}, key={self.key!r}, cache={str(self.cache_path)!r})"

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that keys the cache (a copy)."""
        return dict(self._settings)

    @property
    def key(self) -> str:
        """Hash of the settings that shape the cached models (all but ``tasks``)."""
        return settings_key({k: v for k, v in self._settings.items() if k not in UNKEYED_SETTINGS})

    @property
    def cache_path(self) -> Path:
        """The folder holding this suite's experts and probes for the current settings."""
        return self.cache_root / self.name / self.key

    @cached_property
    def tasks(self) -> list[Task]:
        return self._build_tasks(self._settings)

    def task(self, name: str | Task) -> Task:
        """The task called ``name`` (a :class:`Task` is returned as is)."""
        if isinstance(name, Task):
            return name
        for task in self.tasks:
            if task.name == name:
                return task
        raise EpmqError(f"suite {self.name}: no task {name!r}; tasks are {self.task_names}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @cached_property
    def base_dir(self) -> Path:
        """The pretrained Hugging Face folder all experts start from."""
        return Path(self._base_dir())

    @cached_property
    def tokenizer(self) -> Any:
        return classifier.load_tokenizer(self.base_dir)

    def load_encoder(self, path: str | Path | None = None) -> Any:
        """A ``BertModel`` from ``path`` (an expert folder; default: the pretrained base)."""
        folder = self.base_dir if path is None else path
        encoder = classifier.load_encoder(folder)
        check_vocabulary(encoder, self.tokenizer, folder, self.base_dir)
        return encoder

    def load_head(self, expert_dir: str | Path) -> nn.Linear:
        return classifier.load_head(expert_dir)

    def calibration_batches(
        self,
        task: str | Task,
        tokenizer: Any = None,
        batch_size: int = 16,
        examples: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Tokenized calibration inputs of one task for the encoder, length-sorted and
        dynamically padded: dicts with ``input_ids``, ``attention_mask``, ``token_type_ids``;
        ``examples`` of them (:meth:`Task.calibration_texts`; None: the calibration split)."""
        if batch_size < 1:
            raise EpmqError(f"batch_size must be >= 1, got {batch_size}")
        task = self.task(task)
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        encoded = encode(
            tokenizer,
            task.calibration_texts(examples),
            max_length=task.max_length,
            truncation_side=task.truncation_side,
        )
        return [b for _, b in length_sorted_batches(encoded, batch_size, tokenizer.pad_token_id)]

    def evaluate(
        self, encoder: nn.Module, heads: Mapping[str, nn.Module], **kwargs: Any
    ) -> dict[str, float]:
        """:func:`epmq.eval.accuracy.evaluate_accuracy` on the suite's tasks that have a head
        in ``heads`` (all tasks when every head is given)."""
        from epmq.eval.accuracy import evaluate_accuracy

        unknown = sorted(set(heads) - set(self.task_names))
        if unknown:
            raise EpmqError(f"suite {self.name}: heads for unknown task(s) {unknown}")
        kwargs.setdefault("tokenizer", self.tokenizer)
        tasks = [t for t in self.tasks if t.name in heads]
        return evaluate_accuracy(encoder, heads, tasks, **kwargs)

    # ------------------------------------------------------------------ training + cache

    def _expert_config(self) -> ExpertConfig:
        s = self._settings
        return ExpertConfig(
            steps=s["steps"],
            batch_size=s["batch_size"],
            lr=s["lr"],
            head_lr=s["head_lr"],
            weight_decay=s["weight_decay"],
            warmup=s["warmup"],
            seed=s["seed"],
        )

    def _probe_config(self) -> ProbeConfig:
        s = self._settings
        return ProbeConfig(
            steps=s["probe_steps"],
            lr=s["probe_lr"],
            weight_decay=s["probe_weight_decay"],
            seed=s["seed"],
        )

    def expert_dir(self, task: str | Task) -> Path:
        return self.cache_path / "experts" / self.task(task).name

    def prepare(self, progress: bool = True) -> SuiteModels:
        """Train (or load from the cache) one expert and one pretrained probe per task."""
        root = self.cache_path
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "settings.json").is_file():
            keyed = {k: v for k, v in self._settings.items() if k not in UNKEYED_SETTINGS}
            write_json(root / "settings.json", keyed)
        expert_dirs = {t.name: self.expert_dir(t) for t in self.tasks}
        todo = [t for t in self.tasks if not _is_expert(expert_dirs[t.name])]
        config = self._expert_config()
        with tqdm(
            total=len(todo) * config.steps,
            desc=f"{self.name} experts",
            unit="step",
            disable=not progress or not todo,
            dynamic_ncols=True,
        ) as bar:
            for task in todo:

                def step(loss: float, name: str = task.name) -> None:
                    bar.update(1)
                    bar.set_postfix(task=name, loss=f"{loss:.3f}", refresh=False)

                encoder, head, record = train_expert(
                    self.load_encoder(), task, self.tokenizer, config, on_step=step
                )
                with output_dir(expert_dirs[task.name], force=True) as tmp:
                    classifier.save_expert(
                        tmp,
                        encoder,
                        head,
                        self.tokenizer,
                        task=task.name,
                        classes=task.classes,
                        record={"suite": self.name, "key": self.key, **record},
                    )
        records = {name: classifier.read_expert_info(d) for name, d in expert_dirs.items()}
        probes = self._prepare_probes(progress)
        return SuiteModels(self.base_dir, root, expert_dirs, probes, records)

    def probe_file(self, task: str | Task) -> Path:
        return self.cache_path / "probes" / f"{self.task(task).name}.safetensors"

    def _prepare_probes(self, progress: bool) -> dict[str, nn.Linear]:
        todo = [t for t in self.tasks if not self.probe_file(t).is_file()]
        encoder = self.load_encoder() if todo else None
        config = self._probe_config()
        limit = self._settings["probe_examples"]
        for task in tqdm(todo, desc=f"{self.name} probes", disable=not progress or not todo):
            features = encode_features(encoder, self.tokenizer, task, "train", limit=limit)
            labels = torch.as_tensor(task.train.labels[:limit], dtype=torch.long)
            head = train_probe(features, labels, task.num_classes, config)
            meta = {"suite": self.name, "key": self.key, "task": task.name}
            save_tensors(self.probe_file(task), classifier.head_tensors(head), metadata=meta)
        return {t.name: classifier.load_head(self.probe_file(t).parent, t.name) for t in self.tasks}


def _is_expert(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / classifier.HEAD_FILE).is_file()
