"""The ``jsonl`` format: a folder with ``train.jsonl``, ``test.jsonl``, optionally ``calib.jsonl``.

Each non-empty line is one JSON object with the text in ``text_column`` (a string) and the label
in ``label_column`` (an integer class index or a class name). Errors give ``file:line``.
"""

from __future__ import annotations

import json
from pathlib import Path

from epmq.data.formats.raw import (
    RawData,
    RawLabel,
    RawSplit,
    Request,
    cell_label,
    read_text_file,
    split_files,
)


def read_jsonl(request: Request) -> RawData:
    """Read the split files of a ``jsonl`` task folder."""
    files = split_files(request, ".jsonl")
    return RawData("text", {split: _read_split(request, path) for split, path in files.items()})


def _read_split(request: Request, path: Path) -> RawSplit:
    texts: list[str] = []
    labels: list[RawLabel] = []
    lines: list[int] = []
    for number, line in enumerate(read_text_file(request, path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise request.fail(f"not valid JSON ({exc})", where) from None
        except RecursionError:
            raise request.fail("not valid JSON (nested too deeply)", where) from None
        if not isinstance(row, dict):
            raise request.fail(f"not a JSON object (got {type(row).__name__})", where)
        for column in (request.text_column, request.label_column):
            if column not in row:
                names = ", ".join(repr(c) for c in row) or "none"
                raise request.fail(f"no field {column!r} (fields: {names})", where)
        text = row[request.text_column]
        if not isinstance(text, str):
            raise request.fail(f"field {request.text_column!r} is not a string", where)
        texts.append(text)
        labels.append(cell_label(request, row[request.label_column], where))
        lines.append(number)
    return RawSplit(texts, labels, str(path), lines)
