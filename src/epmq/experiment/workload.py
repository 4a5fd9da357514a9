"""What an experiment runs on: a base encoder, experts with per-task heads, and task data.

A :class:`Workload` hides where models and data come from (a built-in suite, or a user's
folders from a config: :mod:`epmq.experiment.folders`) behind the few operations the runner
needs: load an encoder, calibration batches per task, and per-task accuracy of an encoder with
the task heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

Batch = dict[str, Any]


@dataclass
class Workload:
    """Models and data of one experiment (see the module docstring)."""

    name: str
    tasks: list[str]
    base_dir: Path
    expert_dirs: dict[str, Path]
    heads: dict[str, Any]  # per task: whatever ``evaluate`` reads (a linear head, label words)
    calibration: dict[str, list[Batch]]
    load_encoder: Callable[[Path], nn.Module]
    evaluate: Callable[[nn.Module, Mapping[str, Any], Sequence[str]], dict[str, float]]
    probe_heads: dict[str, Any] | None = None  # heads for the pretrained model's row
    pretrained_name: str = "pretrained (linear probe)"
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def suite_workload(
    suite_name: str,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    calib_batch_size: int = 32,
    calib_examples: int | None = None,
    eval_batch_size: int = 64,
    max_test: int | None = None,
    progress: bool = True,
) -> Workload:
    """Build the workload of a built-in suite, training or loading its experts;
    ``calib_examples`` per task calibrate (None: each task's calibration split)."""
    import time

    from epmq.eval.accuracy import evaluate_accuracy
    from epmq.suites import get_suite

    suite = get_suite(suite_name, cache_dir=cache_dir, quick=quick)
    start = time.perf_counter()
    models = suite.prepare(progress=progress)
    prepared = time.perf_counter() - start
    tasks_by_name = {task.name: task for task in suite.tasks}
    names = list(tasks_by_name)

    def evaluate(
        encoder: nn.Module, heads: Mapping[str, nn.Module], tasks: Sequence[str]
    ) -> dict[str, float]:
        return evaluate_accuracy(
            encoder,
            {t: heads[t] for t in tasks},
            [tasks_by_name[t] for t in tasks],
            tokenizer=suite.tokenizer,
            batch_size=eval_batch_size,
            max_examples=max_test,
        )

    return Workload(
        name=suite.name,
        tasks=names,
        base_dir=Path(suite.base_dir),
        expert_dirs={t: Path(models.expert_dirs[t]) for t in names},
        heads={t: suite.load_head(models.expert_dirs[t]) for t in names},
        calibration={
            t: suite.calibration_batches(t, batch_size=calib_batch_size, examples=calib_examples)
            for t in names
        },
        load_encoder=suite.load_encoder,
        evaluate=evaluate,
        probe_heads=dict(models.probe_heads),
        settings={**suite.settings, "calib_examples": calib_examples}
        if calib_examples is not None
        else dict(suite.settings),
        timings={"prepare_suite": prepared},
    )
