"""Task-data formats, one module each, registered by name in :data:`FORMATS`.

A format is a function ``Request -> RawData`` (see :mod:`epmq.data.formats.raw`): it reads the
splits as stored and leaves classes and label mapping to :mod:`epmq.data.labels`.
"""

from __future__ import annotations

from collections.abc import Callable

from epmq.data.formats.csv_files import read_csv
from epmq.data.formats.hf_disk import read_hf_disk
from epmq.data.formats.image_folder import read_image_folder
from epmq.data.formats.jsonl_files import read_jsonl
from epmq.data.formats.npz_file import read_npz
from epmq.data.formats.raw import RawData, RawSplit, Request
from epmq.errors import EpmqError

FormatReader = Callable[[Request], RawData]

FORMATS: dict[str, FormatReader] = {
    "csv": read_csv,
    "jsonl": read_jsonl,
    "npz": read_npz,
    "imagefolder": read_image_folder,
    "hf_disk": read_hf_disk,
}


def format_reader(name: str, task: str) -> FormatReader:
    """The reader registered as ``name``; an unknown name lists the known ones."""
    reader = FORMATS.get(name)
    if reader is None:
        raise EpmqError(f"task {task}: unknown data format {name!r} (known: {', '.join(FORMATS)})")
    return reader


__all__ = ["FORMATS", "FormatReader", "RawData", "RawSplit", "Request", "format_reader"]
