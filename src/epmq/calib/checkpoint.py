"""Resume support: each finished block's solved linears, saved atomically.

A checkpoint folder holds ``meta.json`` (the run's settings and input identities; a restart
with another fingerprint is refused, naming what changed) and one
``<stage>-block-<NNNN>.safetensors`` per finished block with the solved weights and, for
rounded layers, their codes, scales, zeros and ``g_idx``; the layer records ride in the
file's metadata. Next-block inputs are not stored: a restarted run recomputes
them by replaying the finished blocks, which is deterministic, so the result equals an
uninterrupted run.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from epmq.atomic import save_tensors, write_json
from epmq.calib.records import LayerRecord
from epmq.errors import EpmqError
from epmq.identity import describe_changes
from epmq.quant import QuantGrid, QuantResult

_RESULT_FIELDS = ("codes", "scales", "zeros", "g_idx")


class BlockCheckpoint:
    """Finished blocks of one run, in ``folder``.

    ``settings`` (the engine's) and ``identity`` (what the caller adds: its other settings and
    the identities of its inputs, :mod:`epmq.identity`) are saved in ``meta.json``; a
    checkpoint saved with another fingerprint is refused, naming what changed.
    """

    def __init__(
        self,
        folder: str | Path,
        settings: dict[str, Any],
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        fingerprint = json.loads(json.dumps({**settings, **(identity or {})}, default=str))
        meta = self.folder / "meta.json"
        if meta.is_file():
            try:
                saved = json.loads(meta.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, deep nesting
                raise EpmqError(
                    f"{meta}: not valid JSON ({exc}); remove {self.folder} to start over"
                ) from None
            if saved != fingerprint:
                raise EpmqError(
                    f"checkpoint {self.folder} was written by a run with other settings or "
                    f"inputs ({describe_changes(saved, fingerprint)}); start afresh (epmq "
                    "quantize: without --resume) or use another checkpoint folder"
                )
        else:
            write_json(meta, fingerprint)

    def _path(self, stage: str, block: int) -> Path:
        return self.folder / f"{stage}-block-{block:04d}.safetensors"

    def has(self, stage: str, block: int) -> bool:
        """Whether block ``block`` of ``stage`` is finished."""
        return self._path(stage, block).is_file()

    def save(
        self,
        stage: str,
        block: int,
        weights: dict[str, Tensor],
        results: dict[str, QuantResult],
        records: list[LayerRecord],
    ) -> None:
        """Save a finished block (one atomic file)."""
        tensors: dict[str, Tensor] = {f"{name}::weight": w for name, w in weights.items()}
        grids: dict[str, dict[str, Any]] = {}
        for name, result in results.items():
            for key in _RESULT_FIELDS:
                tensors[f"{name}::{key}"] = getattr(result, key)
            grids[name] = {
                "bits": result.grid.bits,
                "group_size": result.grid.group_size,
                "symmetric": result.grid.symmetric,
                "proxy_loss": float(result.proxy_loss),
                "damping": float(result.damping),
                "damping_retries": int(result.damping_retries),
                "seconds": float(result.seconds),
            }
        metadata = {
            "records": json.dumps([r.to_dict() for r in records]),
            "results": json.dumps(grids),
        }
        save_tensors(self._path(stage, block), tensors, metadata)

    def load(
        self, stage: str, block: int
    ) -> tuple[dict[str, Tensor], dict[str, QuantResult], list[LayerRecord]]:
        """Weights, results and records of a finished block (a damaged file: one line)."""
        path = self._path(stage, block)
        try:
            return self._load(path)
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
            why = f"no {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())
            raise EpmqError(
                f"{path}: damaged checkpoint block ({why}); remove {self.folder} to start over"
            ) from None

    @staticmethod
    def _load(path: Path) -> tuple[dict[str, Tensor], dict[str, QuantResult], list[LayerRecord]]:
        from epmq.merging.checkpoint import open_safetensors

        with open_safetensors(path) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        weights = {k[: -len("::weight")]: v for k, v in tensors.items() if k.endswith("::weight")}
        results: dict[str, QuantResult] = {}
        for name, info in json.loads(metadata.get("results", "{}")).items():
            grid = QuantGrid(info["bits"], info["group_size"], info["symmetric"])
            weight = weights[name]
            scales = tensors[f"{name}::scales"]
            results[name] = QuantResult(
                # the model's weight when it holds the result's values (a float32 model), as
                # after the run that saved the block (QuantResult.share_with)
                weight=weight if weight.dtype == scales.dtype else None,
                codes=tensors[f"{name}::codes"],
                scales=scales,
                zeros=tensors[f"{name}::zeros"],
                g_idx=tensors[f"{name}::g_idx"].to(torch.int32),
                grid=grid,
                proxy_loss=info["proxy_loss"],
                damping=info["damping"],
                damping_retries=info["damping_retries"],
                seconds=info["seconds"],
            )
        records = [LayerRecord.from_dict(r) for r in json.loads(metadata.get("records", "[]"))]
        return weights, results, records


def _checkpoint_entry(entry: Path) -> bool:
    name = entry.name
    if entry.is_dir():
        return re.fullmatch(r"rank\d+", name) is not None and all(
            _checkpoint_entry(e) for e in entry.iterdir()
        )
    block = re.fullmatch(r".+-block-\d{4}\.safetensors", name) is not None
    return name == "meta.json" or block or (name.startswith(".") and name.endswith(".tmp"))


def remove_checkpoint(folder: str | Path) -> None:
    """Delete a checkpoint folder left by an earlier run (also one of per-rank checkpoints,
    ``rank<N>/``), so no later resume can take its blocks; a folder holding anything else than
    checkpoint files is refused, not deleted."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir() or not all(_checkpoint_entry(e) for e in folder.iterdir()):
        raise EpmqError(f"{folder} is not an epmq block checkpoint; move it away or remove it")
    shutil.rmtree(folder)
