"""Data-driven merges of checkpoint folders (RegMean): the same layer-wise solver as in runs.

A merge method whose registry entry needs per-task Grams (``requires_grams``) is solved the
way an experiment solves it: the non-linear parameters are averaged tensor by tensor
(:func:`epmq.merging.merge_checkpoints` with ``average``), then the calibration engine walks the
averaged model block by block, collects each task's Grams from its calibration batches and
solves every linear with the solver of the same name (:mod:`epmq.quant.solvers.regmean`),
reading the experts one block at a time. The merged folder is written atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from epmq.atomic import output_dir, refuse_existing, refuse_overlap
from epmq.calib.engine import EngineOptions, quantize_model
from epmq.calib.expert_weights import SafetensorsExpert
from epmq.errors import EpmqError
from epmq.merging import get_method, merge_checkpoints
from epmq.models.adapter import Batch
from epmq.models.registry import load_model


def merge_with_data(
    base_dir: Path,
    expert_dirs: Sequence[Path],
    out: Path,
    method: str,
    calib: Mapping[str, Sequence[Batch]],
    *,
    force: bool = False,
    progress: bool = True,
    **params: Any,
) -> Path:
    """Merge ``expert_dirs`` (one per task of ``calib``, in order) into ``out`` with the
    data-driven ``method``; ``params`` are the method's declared parameters."""
    resolved = get_method(method).resolve(params, len(expert_dirs))
    if len(calib) != len(expert_dirs):
        raise EpmqError(
            f"{len(expert_dirs)} experts need {len(expert_dirs)} calibration tasks (--calib), "
            f"one per expert in the same order; got {len(calib)}"
        )
    refuse_overlap(out, [("base", base_dir), *(("expert", Path(d)) for d in expert_dirs)])
    refuse_existing(out, force)
    with output_dir(out, force=force) as partial:
        averaged = partial / "averaged"
        merge_checkpoints(base_dir, expert_dirs, averaged, "average")
        model, adapter = load_model(averaged)
        experts = [SafetensorsExpert(d, name=t) for t, d in zip(calib, expert_dirs, strict=True)]
        quantize_model(
            model,
            adapter,
            calib,
            method=method,
            experts=experts,
            **resolved,
            engine=EngineOptions(progress=progress),
        )
        model.save_pretrained(partial)
        for extra in averaged.iterdir():  # the base's tokenizer files (not its weights)
            weights = extra.suffix in (".safetensors", ".bin") or extra.name.endswith(".index.json")
            if not weights and not (partial / extra.name).exists():
                shutil.copy2(extra, partial / extra.name)
        shutil.rmtree(averaged)
    return out
