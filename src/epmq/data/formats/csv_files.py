"""The ``csv`` format: a folder with ``train.csv``, ``test.csv`` and optionally ``calib.csv``.

Each file has a header row; the text is in ``text_column`` and the label in ``label_column``
(other columns are ignored). Cells are strings, so labels are class names or whole numbers;
:mod:`epmq.data.labels` decides which. Quoted cells may span lines; error messages give the
line where a row starts.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from epmq.data.formats.raw import RawData, RawSplit, Request, read_text_file, split_files


def read_csv(request: Request) -> RawData:
    """Read the split files of a ``csv`` task folder."""
    files = split_files(request, ".csv")
    return RawData("text", {split: _read_split(request, path) for split, path in files.items()})


def _read_split(request: Request, path: Path) -> RawSplit:
    reader = csv.reader(io.StringIO(read_text_file(request, path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise request.fail("is empty (expected a header row)", path)
        columns = {name.strip(): i for i, name in enumerate(header)}
        indices = []
        for column in (request.text_column, request.label_column):
            if column not in columns:
                names = ", ".join(repr(c) for c in columns) or "none"
                raise request.fail(f"no column {column!r} (columns: {names})", path)
            indices.append(columns[column])
        text_at, label_at = indices
        texts, labels, lines = [], [], []
        start = reader.line_num + 1
        for row in reader:
            if not any(cell.strip() for cell in row):
                start = reader.line_num + 1
                continue
            if max(text_at, label_at) >= len(row):
                raise request.fail(
                    f"has {len(row)} cells but the header has {len(header)}", f"{path}:{start}"
                )
            label = row[label_at].strip()
            if not label:
                raise request.fail(f"empty {request.label_column!r} cell", f"{path}:{start}")
            texts.append(row[text_at])
            labels.append(label)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise request.fail(str(exc), f"{path}:{reader.line_num}") from None
    return RawSplit(texts, labels, str(path), lines)
