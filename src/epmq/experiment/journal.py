"""The journal of a running experiment: every finished model's figures, so a stopped run resumes.

An experiment evaluates dozens of models (the demo: about fifty, a quarter of an hour on two
cores). Each finished table row or sweep point is appended to ``journal.jsonl`` in the run's
partial output folder as one JSON line, flushed and fsynced before the next model starts. The
first line fingerprints the run (the config without its output block, the workload's settings
and tasks, the identities of its inputs); ``epmq run/demo --resume`` reads the journal back,
checks the fingerprint (a mismatch is refused, naming what changed), and the runner skips
every model already in it (and every merge whose models are all done). A line cut short by a
crash is ignored, so at most the model being built when the run stopped is redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from epmq.errors import DISK_FULL, EpmqError
from epmq.eval.results import Row, SweepPoint
from epmq.identity import describe_changes

JOURNAL_FILE = "journal.jsonl"


class Journal:
    """Append-only record of the finished models of one run (see the module docstring)."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], *, resume: bool) -> None:
        self.path = Path(folder) / JOURNAL_FILE
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.rows: dict[str, Row] = {}
        self.points: dict[str, SweepPoint] = {}
        self.exports: list[dict[str, Any]] = []  # checkpoints written (see VariantExporter)
        if resume and self.path.is_file():
            self._read()
        else:
            self._append({"fingerprint": self.fingerprint}, mode="w")

    @property
    def done(self) -> int:
        """How many models the journal holds."""
        return len(self.rows) + len(self.points)

    def row(self, key: str) -> Row | None:
        """The finished table row recorded under ``key`` (a variant or row name), if any."""
        return self.rows.get(key)

    def point(self, key: str) -> SweepPoint | None:
        """The finished sweep point recorded under ``key``, if any."""
        return self.points.get(key)

    def has(self, key: str) -> bool:
        return key in self.rows or key in self.points

    def add_row(self, key: str, row: Row) -> None:
        self.rows[key] = row
        self._append({"key": key, "row": row.model_dump(mode="json")})

    def add_point(self, key: str, point: SweepPoint) -> None:
        self.points[key] = point
        self._append({"key": key, "point": point.model_dump(mode="json")})

    def add_export(self, record: dict[str, Any]) -> None:
        self.exports.append(record)
        self._append({"export": record})

    def _append(self, entry: dict[str, Any], mode: str = "a") -> None:
        try:
            with open(self.path, mode, encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise EpmqError(f"cannot write {self.path}: {os.strerror(exc.errno)}") from None

    def _read(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise EpmqError(f"{self.path}: not UTF-8 text; pass --force to start over") from None
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                if number == len(lines):  # the line being written when the run stopped
                    break
                raise EpmqError(f"{self.path}: line {number} is not valid JSON") from None
            if not isinstance(entry, dict):
                raise EpmqError(f"{self.path}: line {number} is not a JSON object")
            entries.append(entry)
        saved = entries[0].get("fingerprint") if entries else None
        if saved != self.fingerprint:
            raise EpmqError(
                f"{self.path}: the stopped run had other settings or inputs than this one "
                f"({describe_changes(saved, self.fingerprint)}); pass --force to start over"
            )
        for entry in entries[1:]:
            try:
                if "row" in entry:
                    self.rows[entry["key"]] = Row.model_validate(entry["row"])
                elif "export" in entry:
                    self.exports.append(dict(entry["export"]))
                else:
                    self.points[entry["key"]] = SweepPoint.model_validate(entry["point"])
            except (KeyError, ValueError, TypeError) as exc:
                raise EpmqError(f"{self.path}: unreadable entry ({exc})") from None
        # Rewrite what was read (drops a cut-off last line) so later appends stay parseable.
        kept = [entries[0], *(e for e in entries[1:] if {"row", "point", "export"} & set(e))]
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)
