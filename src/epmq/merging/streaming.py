"""Out-of-core merging of checkpoint folders, one tensor at a time.

Memory: one base tensor, one tensor per expert (stacked in float32) and the method's
temporaries, never whole models. Steps:

1. read every folder's headers and validate keys, shapes, dtypes, Grams and parameters
   (nothing is read or written before this passes);
2. for global top-k methods (TIES with ``topk_scope="global"``), two exact threshold passes
   over the merged tensors (:mod:`epmq.merging.topk`);
3. merge each tensor and stream it into the output shards (the base's shard layout, or one
   ``model.safetensors`` for a ``.bin`` base), checking NaN/Inf tensor by tensor.

The output folder is built in a hidden partial folder (:func:`epmq.atomic.output_dir`), so an
error anywhere (e.g. a NaN in the last tensor) leaves no output behind. It holds the base's
config, tokenizer, processor and generation files, the merged weights and ``merge_record.json``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from epmq import __version__
from epmq.atomic import output_dir, refuse_existing, refuse_overlap, write_json
from epmq.merging.checkpoint import CheckpointReader
from epmq.merging.engine import make_plan
from epmq.merging.writer import StreamingSafetensorsWriter

log = logging.getLogger("epmq.merging")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
RECORD = "merge_record.json"


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy config, tokenizer, processor and generation files (every top-level file that is
    not a weight file, a weight index or an earlier merge record)."""
    copied = []
    for path in sorted(source.iterdir()):
        name = path.name
        skip = (
            name.startswith(".")
            or name.endswith(WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
            or name == RECORD
        )
        if skip:
            continue
        if path.is_dir():
            log.info("not copying sub-folder %s of the base", path)
            continue
        shutil.copy2(path, target / name)
        copied.append(name)
    return copied


def merge_checkpoints(
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    out_dir: str | Path,
    method: str,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    grams: Mapping[str, Sequence[torch.Tensor]] | None = None,
    force: bool = False,
    **params: Any,
) -> Path:
    """Merge Hugging Face checkpoint folders tensor by tensor into ``out_dir``.

    ``grams`` may be any mapping (e.g. a lazy one reading from disk); it is read one weight at
    a time. Returns ``out_dir``; it refuses to overwrite an existing folder unless ``force``.
    """
    out = Path(out_dir)
    base_path = Path(base_dir)
    inputs = [("base", base_path), *(("expert", Path(d)) for d in expert_dirs)]
    grams_file = getattr(grams, "path", None)  # a GramFile reads from disk
    if isinstance(grams_file, Path):
        inputs.append(("grams file", grams_file))
    refuse_overlap(out, inputs)
    refuse_existing(out, force)
    if (base_path / "config.json").is_file():  # copied into the output: it must be readable
        from epmq.models.folder import read_config

        read_config(base_path)
    base = CheckpointReader(base_path)
    experts = [CheckpointReader(folder) for folder in expert_dirs]
    plan = make_plan(
        method,
        params,
        base.meta,
        [e.meta for e in experts],
        [f"expert {Path(d)}" for d in expert_dirs],
        include=include,
        exclude=exclude,
        grams=grams,
    )
    loaders = [e.get for e in experts]
    plan.compute_thresholds(base.get, loaders)
    with output_dir(out, force=force) as partial:
        copied = copy_side_files(base_path, partial)
        shards = base.shards()
        weight_map: dict[str, str] = {}
        total = 0
        for file, names in shards.items():
            layout = [(n, base.meta[n]) for n in names]
            with StreamingSafetensorsWriter(partial / file, layout, {"format": "pt"}) as writer:
                for name in names:
                    writer.add(name, plan.merge_tensor(name, base.get, loaders))
                    weight_map[name] = file
            total += writer.total_size
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            write_json(partial / "model.safetensors.index.json", index)
        record = {
            "epmq_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base": str(base_path),
            "experts": [str(Path(d)) for d in expert_dirs],
            "include": list(plan_patterns(include)),
            "exclude": list(plan_patterns(exclude)),
            **plan.record(),
            "copied_files": copied,
        }
        write_json(partial / RECORD, record)
    log.info("merged %d experts with %s into %s", len(experts), method, out)
    return out


def plan_patterns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Patterns as a tuple (for the record)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)
