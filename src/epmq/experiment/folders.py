"""The workload of a user's config: a base model folder, expert folders and task data on disk.

Each task's data is read in its own format (:mod:`epmq.data`), each expert's head is built
by its model family (:mod:`epmq.heads`), calibration batches are drawn per task from the
training (or calibration) split with the config's seed, and evaluation scores the test split.
Every user mistake found here (missing data, unknown format, a label outside the head's
classes, an image size the model cannot take, an expert without its head, a head of the
wrong width, a head whose outputs follow another class order or read another feature: see
:mod:`epmq.heads.checks`) is one :class:`~epmq.errors.EpmqError` naming it, raised before any
merging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epmq.data import Examples, TaskData, read_task_data, shared_examples
from epmq.devices import resolve_device
from epmq.errors import EpmqError
from epmq.eval.accuracy import evaluation_precision
from epmq.experiment.config import ExperimentConfig, TaskSpec
from epmq.experiment.workload import Workload
from epmq.heads import FamilyTasks, HeadOptions, family_tasks
from epmq.heads.checks import check_expert_head
from epmq.models.folder import read_config
from epmq.models.registry import detect_family

log = logging.getLogger(__name__)


def config_family(config: ExperimentConfig) -> str:
    """The model family: the config's ``family``, checked against the base's config.json."""
    assert config.base is not None
    detected = detect_family(config.base.path)
    if config.family is not None and config.family != detected:
        raise EpmqError(
            f"family: the config says {config.family!r} but {config.base.path}/config.json "
            f"holds a {detected!r} model"
        )
    return detected


def head_options(config: ExperimentConfig) -> HeadOptions:
    """The config's settings the task heads read."""
    image = None if config.image is None else config.image.model_dump(exclude_none=True)
    return HeadOptions(pooling=config.pooling, image=image, merge_pooler=config.merge_pooler)


def read_tasks(config: ExperimentConfig) -> dict[str, TaskData]:
    """Every task's data, read in its own format."""
    return {
        t.name: read_task_data(
            t.name,
            Path(t.data),
            t.format,
            text_column=t.text_column,
            label_column=t.label_column,
            image_column=t.image_column,
            classes=t.classes,
            allow_pickle=t.allow_pickle,
        )
        for t in config.tasks
    }


def warn_shared_examples(data: TaskData, calib: Examples, test: Examples) -> None:
    """One warning line when calibration examples are also test examples (exact copies, by
    hash: :func:`~epmq.data.shared_examples`): the accuracy is then measured partly on data
    the quantizer has seen. The examples compared are the ones used: the calibration draw and
    the evaluated test examples."""
    shared = shared_examples(calib, test)
    if shared:
        log.warning(
            "task %s: %d of the %d calibration examples are identical to test examples (%s); "
            "the test accuracy is not held out from calibration",
            data.name,
            shared,
            len(calib),
            data.source,
        )


def calib_size(task: TaskSpec, config: ExperimentConfig) -> int:
    """How many calibration examples ``task`` gives: its ``calib_size``, else the config's
    ``calibration.examples``, else 128."""
    return task.calib_size or config.calibration.examples or 128


def test_limit(task: TaskSpec, config: ExperimentConfig) -> int | None:
    """How many test examples of ``task`` are evaluated (None: all)."""
    limits = [n for n in (task.test_size, config.evaluation.max_test) if n is not None]
    return min(limits) if limits else None


def check_heads(
    config: ExperimentConfig,
    logic: FamilyTasks,
    specs: Mapping[str, TaskSpec],
    data: Mapping[str, TaskData],
    heads: Mapping[str, Any],
    calib: Mapping[str, Examples],
) -> dict[str, float | None]:
    """Each expert's head checked on its task's calibration draw before any merging
    (:mod:`epmq.heads.checks`: class order, ``head_input``), the expert held and run as the
    experts' row evaluates it; per task its calibration accuracy (None: not checked)."""
    device = resolve_device(config.device)
    dtype = getattr(torch, config.model_dtype)
    experts = {e.task: e for e in config.experts}
    batch_size = config.evaluation.batch_size
    with evaluation_precision(config.evaluation.dtype, device or "cpu"):
        return {
            t: check_expert_head(
                logic, specs[t], data[t], experts[t], heads[t], calib[t], batch_size, device, dtype
            )
            for t in specs
        }


def folder_workload(config: ExperimentConfig) -> Workload:
    """Build the workload of a config naming ``base``, ``experts`` and ``tasks``."""
    if config.base is None:
        raise EpmqError("config: 'base' is required when no built-in 'suite' is named")
    start = time.perf_counter()
    family = config_family(config)
    for expert in config.experts:
        read_config(expert.path)  # each expert must be a model folder
    logic = family_tasks(family, config.base.path, head_options(config))
    specs = {t.name: t for t in config.tasks}
    data = read_tasks(config)
    experts = {e.task: e for e in config.experts}
    names = [t.name for t in config.tasks]
    heads = {t: logic.head(specs[t], data[t], experts[t]) for t in names}
    calib = {t: data[t].calibration(calib_size(specs[t], config), seed=config.seed) for t in names}
    checked = check_heads(config, logic, specs, data, heads, calib)
    calibration = {
        t: logic.calibration_batches(specs[t], heads[t], calib[t], config.calibration.batch_size)
        for t in names
    }
    tests = {t: data[t].test_examples(test_limit(specs[t], config)) for t in names}
    for t in names:
        warn_shared_examples(data[t], calib[t], tests[t])

    def evaluate(
        model: nn.Module, task_heads: Mapping[str, Any], tasks: Sequence[str]
    ) -> dict[str, float]:
        return {
            t: logic.accuracy(
                model, task_heads[t], specs[t], tests[t], config.evaluation.batch_size
            )
            for t in tasks
        }

    return Workload(
        name=config.name,
        tasks=names,
        base_dir=Path(config.base.path),
        expert_dirs={t: Path(experts[t].path) for t in names},
        heads=heads,
        calibration=calibration,
        load_encoder=logic.load_model,
        evaluate=evaluate,
        probe_heads=heads,
        pretrained_name="pretrained",
        settings={
            "family": family,
            "tasks": {
                t: {
                    "data": str(specs[t].data),
                    "format": specs[t].format,
                    "classes": list(data[t].classes),
                    "train": len(data[t].train),
                    "calib": len(data[t].calib) if data[t].calib is not None else 0,
                    "test": len(tests[t]),
                    "expert": experts[t].name,
                    "expert_calibration_accuracy": checked[t],
                }
                for t in names
            },
        },
        timings={"prepare_workload": time.perf_counter() - start},
    )
