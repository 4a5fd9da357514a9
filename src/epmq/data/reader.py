""":func:`read_task_data`: one task's labelled data from disk, in any registered format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from epmq.data.examples import Examples, TaskData
from epmq.data.formats import format_reader
from epmq.data.formats.raw import Request
from epmq.data.labels import resolve_labels


def read_task_data(
    name: str,
    path: Path,
    format: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    image_column: str = "image",
    classes: Sequence[str] | None = None,
    allow_pickle: bool = False,
) -> TaskData:
    """Read task ``name`` from ``path`` in ``format`` (``csv``, ``jsonl``, ``npz``,
    ``imagefolder`` or ``hf_disk``; see :mod:`epmq.data`).

    Returns the train and test splits (and the calibration split when the data has one) with
    labels mapped to indices into the task's classes. Every problem with the data (missing
    path, split, column or array, bad label, empty split) is an :class:`~epmq.errors.EpmqError`
    naming the task and the file. Images are not decoded here. ``allow_pickle`` lets the
    ``npz`` format unpickle object arrays (unsafe: a crafted file runs code); else they are
    refused.
    """
    reader = format_reader(format.strip().lower(), name)
    request = Request(
        task=name,
        path=Path(path).expanduser(),
        text_column=text_column,
        label_column=label_column,
        image_column=image_column,
        classes=tuple(classes) if classes is not None else None,
        allow_pickle=allow_pickle,
    )
    raw = reader(request)
    for split_name, split in raw.splits.items():
        if len(split.inputs) == 0:
            raise request.fail(f"the {split_name} split holds no examples", split.where)
    names, labels = resolve_labels(request, raw)
    splits = {s: Examples(raw.splits[s].inputs, labels[s]) for s in raw.splits}
    return TaskData(
        name=name,
        modality=raw.modality,
        classes=names,
        train=splits["train"],
        test=splits["test"],
        calib=splits.get("calib"),
        source=str(request.path),
    )
