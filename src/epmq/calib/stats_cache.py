"""Calibration statistics shared by several runs on the same merged model.

With ``x_source="merged"`` every linear's inputs come from the full-precision merge, so the
per-task Grams ``H_i`` of a block do not depend on the quantizer, the bit width, α or the
E-PMQ target: every variant of one merge can be solved from the same statistics. A
:class:`StatsCache` keeps them per block (keyed by stage and block index; each block's entry
holds every linear's per-task Gram sums and token counts): the first run through
:func:`epmq.calib.quantize_model` fills it, later runs read it back and skip capture,
forward passes and Gram accumulation altogether.

Blocks are held in memory up to ``memory_limit`` bytes, further ones are written to
``folder`` (a temporary folder when none is given) as safetensors and read back on demand;
:meth:`StatsCache.close` removes a temporary folder.

One cache belongs to one (model, calibration data, task list) triple; the caller keeps them
together (the experiment runner makes one cache per merge), and :meth:`StatsCache.check`
refuses runs whose task list or settings differ from the run that filled it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epmq.atomic import save_tensors
from epmq.calib.statistics import TaskStatistics
from epmq.errors import EpmqError
from epmq.quant import GramAccumulator

DEFAULT_MEMORY_LIMIT = 512 * 2**20


class StatsCache:
    """Per-block statistics of the merged stream, in memory then on disk (module docs)."""

    def __init__(
        self, folder: str | Path | None = None, *, memory_limit: int = DEFAULT_MEMORY_LIMIT
    ) -> None:
        self.memory_limit = memory_limit
        self._folder = Path(folder) if folder is not None else None
        self._temporary = False
        self._memory: dict[tuple[str, int], TaskStatistics] = {}
        self._on_disk: dict[tuple[str, int], Path] = {}
        self._bytes = 0
        self._scope: dict[str, Any] | None = None
        self.complete = False
        self.hits = 0

    # -- scope ----------------------------------------------------------------------------
    def check(self, scope: dict[str, Any]) -> None:
        """Bind the cache to the first run's ``scope`` (tasks, token counts, stages); refuse
        a later run with another one."""
        if self._scope is None:
            self._scope = dict(scope)
        elif self._scope != scope:
            changed = sorted(k for k in scope.keys() | self._scope.keys()
                             if scope.get(k) != self._scope.get(k))  # fmt: skip
            raise EpmqError(
                f"statistics cache was filled by a run with other data ({', '.join(changed)}); "
                "use one cache per merged model and calibration set"
            )

    # -- blocks ---------------------------------------------------------------------------
    def has(self, stage: str, block: int) -> bool:
        """Whether the statistics of ``block`` of ``stage`` are stored."""
        return (stage, block) in self._memory or (stage, block) in self._on_disk

    def store(self, stage: str, block: int, stats: TaskStatistics) -> None:
        """Keep ``stats`` (in CPU memory while under the limit, else on disk)."""
        _to_host(stats)
        size = _nbytes(stats)
        if self._bytes + size <= self.memory_limit:
            self._memory[(stage, block)] = stats
            self._bytes += size
            return
        path = self._spill_folder() / f"{stage}-block-{block:04d}.safetensors"
        save_tensors(path, _tensors(stats))
        self._on_disk[(stage, block)] = path

    def load(self, stage: str, block: int, module: nn.Module) -> TaskStatistics:
        """The statistics stored for ``block`` of ``stage`` (``module``: that block)."""
        self.hits += 1
        stats = self._memory.get((stage, block))
        if stats is not None:
            return stats
        path = self._on_disk.get((stage, block))
        if path is None:
            raise EpmqError(f"statistics cache holds no block {stage}.{block}")
        return _read(path, module)

    def close(self) -> None:
        """Drop every entry; remove the folder if the cache made it."""
        self._memory.clear()
        self._on_disk.clear()
        self._bytes = 0
        self.complete = False
        if self._temporary and self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
            self._temporary = False

    def __enter__(self) -> StatsCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spill_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="epmq-stats-"))
            self._temporary = True
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder


def _to_host(stats: TaskStatistics) -> None:
    """Move statistics gathered on a GPU into CPU memory (a no-op on the CPU)."""
    if stats.device.type == "cpu":
        return
    stats.replace_accumulators(
        lambda acc: GramAccumulator.from_state_dict(
            {k: v.cpu() for k, v in acc.state_dict().items()}, dtype=acc.dtype
        )
    )
    stats.device = torch.device("cpu")


def _nbytes(stats: TaskStatistics) -> int:
    states = [acc.state_dict() for acc in stats.distinct_accumulators()]
    return sum(t.numel() * t.element_size() for state in states for t in state.values())


def _tensors(stats: TaskStatistics) -> dict[str, Tensor]:
    """``<linear>::<task>::<gram_sum|count|cross_sum>`` for every accumulator."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, accs in stats.acc.items():
        for task, acc in accs.items():
            for key, value in acc.state_dict().items():
                # a shared accumulator (q/k/v) is written once per linear: safetensors
                # takes no two names for one tensor
                out[f"{name}::{task}::{key}"] = value.clone() if id(acc) in seen else value
            seen.add(id(acc))
    return out


def _read(path: Path, module: nn.Module) -> TaskStatistics:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, task, field = key.split("::")
        parts.setdefault((name, task), {})[field] = value
    names = list(dict.fromkeys(name for name, _ in parts))
    tasks = list(dict.fromkeys(task for _, task in parts))
    cross = any("cross_sum" in state for state in parts.values())
    stats = TaskStatistics(module, names, tasks, cross=cross)
    for name in names:
        for task in tasks:
            stats.acc[name][task] = GramAccumulator.from_state_dict(parts[(name, task)])
    return stats
