"""Exporting an experiment's quantized models as deployable checkpoints (``output.export``).

Every quantized variant of the table (not the α-sweep points) is written in every format the
config lists, to ``<output dir>/exports/<format>/<variant>/`` (see :mod:`epmq.export`), as soon
as it is built, so memory still holds one variant at a time. Linear task heads (BERT, CLIP
head files, the heads inside task models' checkpoints) are stored beside the weights as
``heads/<task>.safetensors``; every folder's
``epmq_record.json`` names the merge, quantizer and settings that made it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from epmq.atomic import save_tensors
from epmq.calib.engine import CalibrationRun
from epmq.experiment.config import ExperimentConfig
from epmq.experiment.journal import Journal
from epmq.experiment.plan import Variant
from epmq.experiment.workload import Workload


def variant_folder_name(variant: Variant) -> str:
    """A file-system-safe folder name for a variant (``task_arithmetic-epmq-w4-g128-a0.1``)."""
    return variant.slug


class VariantExporter:
    """The runner's ``on_model`` callback that exports quantized variants (module docs)."""

    def __init__(
        self,
        config: ExperimentConfig,
        workload: Workload,
        root: Path,
        journal: Journal | None = None,
    ) -> None:
        self.config = config
        self.workload = workload
        self.root = Path(root)
        self.journal = journal  # records each export, so a resumed run still lists them all
        self.written: list[dict[str, Any]] = []
        for record in journal.exports if journal else []:
            self._list(record)

    def __call__(self, variant: Variant, model: nn.Module, run: CalibrationRun | None) -> None:
        if variant.kind != "quantized" or variant.sweep is not None or run is None:
            return
        from epmq.export import export_checkpoint

        for fmt in self.config.output.export:
            folder = self.root / fmt / variant_folder_name(variant)
            summary = export_checkpoint(
                model,
                run.results,
                folder,
                format=fmt,
                base_dir=self.workload.base_dir,
                record={"experiment": self.config.name, "variant": variant.name, **run.settings},
                force=True,
            )
            self._write_heads(folder)
            record = {
                "variant": variant.name,
                "format": fmt,
                "folder": str(folder.relative_to(self.root.parent)),
                "weights_bytes": summary.weights_bytes,
                "float16_bytes": summary.float16_bytes,
            }
            self._list(record)
            if self.journal is not None:
                self.journal.add_export(record)

    def _list(self, record: dict[str, Any]) -> None:
        """Add ``record`` to :attr:`written`, replacing an earlier export of the same variant and
        format (one a stopped run wrote before journalling its row, so the resumed run redid
        it): each export is listed once, where the uninterrupted run lists it."""
        key = (record["variant"], record["format"])
        self.written = [r for r in self.written if (r["variant"], r["format"]) != key]
        self.written.append(record)

    def _write_heads(self, folder: Path) -> None:
        """Every task head that is a module, as ``heads/<task>.safetensors``: a linear head's
        ``weight`` and ``bias``; a head read from a task model's checkpoint (pooler,
        classifier, ...) its modules' tensors under their names there. The metadata names
        the head's class and the features it reads."""
        for task, head in self.workload.heads.items():
            if not isinstance(head, nn.Module):
                continue  # label words or prompts: nothing to store
            tensors = {k: v.detach().float() for k, v in head.state_dict().items()}
            about = {"class": type(head).__name__}
            reads = getattr(head, "reads", None)
            if isinstance(reads, str):
                about["reads"] = reads
            # one metadata key: safetensors writes several in no fixed order (bytes would vary)
            metadata = {"epmq_head": json.dumps(about, sort_keys=True)}
            save_tensors(folder / "heads" / f"{task}.safetensors", tensors, metadata)
