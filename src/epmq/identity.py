"""Input identities: what a resumed run compares to be sure it reads the same inputs.

A resumable run (``epmq quantize --resume``, ``epmq run/demo --resume``) stores a fingerprint
of every setting and of every input it reads; a resume whose fingerprint differs is refused,
naming what changed (:func:`describe_changes`), so finished work is never spliced into a run
on other inputs.

The identity of a file is its resolved path, its size and a digest of its content:

- a file under :data:`FULL_HASH_BYTES` (64 MiB): the sha256 of the whole file;
- a larger ``.safetensors`` file: the sha256 of its header (the 8-byte length and the JSON
  header: names, dtypes, shapes, offsets) plus its modification time in nanoseconds;
- any other larger file: the sha256 of its first and last MiB plus its modification time.

Large files are thus not read in full: a same-shaped file written in place is told apart by
its modification time. A folder's identity lists every regular file under it (recursively,
skipping hidden names such as ``.git`` or a partial output), by relative path; a missing path
is recorded as missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 1 << 20
_CHUNK = 1 << 20


def file_identity(path: str | Path) -> dict[str, Any]:
    """The identity of one file (see the module docstring)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    found: dict[str, Any] = {"kind": "file", "path": str(path), "size": stat.st_size}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if stat.st_size < FULL_HASH_BYTES:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
            found["sha256"] = digest.hexdigest()
            return found
        found["mtime_ns"] = stat.st_mtime_ns
        head = handle.read(8)
        if path.suffix == ".safetensors" and len(head) == 8:
            length = int.from_bytes(head, "little")
            digest.update(head + handle.read(min(length, stat.st_size - 8)))
            found["header_sha256"] = digest.hexdigest()
            return found
        digest.update(head + handle.read(EDGE_BYTES - 8))
        handle.seek(max(stat.st_size - EDGE_BYTES, 0))
        digest.update(handle.read(EDGE_BYTES))
        found["edges_sha256"] = digest.hexdigest()
    return found


def _files(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _files(entry)
        elif entry.is_file():
            yield entry


def path_identity(path: str | Path) -> dict[str, Any]:
    """The identity of a file, a folder (every regular file under it) or a missing path."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return file_identity(path)
    if not path.is_dir():
        return {"kind": "missing", "path": str(path)}
    files = {}
    for file in _files(path):
        found = file_identity(file)
        del found["path"]
        files[file.relative_to(path).as_posix()] = found
    return {"kind": "folder", "path": str(path), "files": files}


def input_identities(inputs: Iterable[tuple[str, str | Path]]) -> dict[str, dict[str, Any]]:
    """``label → identity`` for labelled inputs (``(label, path)`` pairs, as given to
    :func:`epmq.atomic.refuse_overlap`)."""
    return {label: path_identity(path) for label, path in inputs}


def describe_changes(old: Any, new: Any, limit: int = 3) -> str:
    """What differs between two fingerprints (JSON-like: dicts, lists, scalars, identities),
    as dotted paths — ``max_length 128 → 64``, ``--model folder: model.safetensors changed``
    — the first ``limit`` of them, and how many more."""
    changes = list(_changes(old, new, ""))
    text = "; ".join(changes[:limit])
    if len(changes) > limit:
        text += f"; and {len(changes) - limit} more"
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_identity(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("kind") in ("file", "folder", "missing")


def _identity_changes(old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> Iterator[str]:
    if old["kind"] == "missing" or new["kind"] == "missing":
        yield f"{where} {new['path']} {'is missing' if new['kind'] == 'missing' else 'appeared'}"
    elif old["path"] != new["path"]:
        yield f"{where} moved: {old['path']} → {new['path']}"
    elif old["kind"] != new["kind"]:
        yield f"{where} {new['path']} is now a {new['kind']}"
    elif old["kind"] == "file":
        yield f"{where} {Path(new['path']).name} changed"
    else:
        before, after = old["files"], new["files"]
        for name in sorted(before.keys() | after.keys()):
            if name not in before:
                yield f"{where}: {name} added"
            elif name not in after:
                yield f"{where}: {name} removed"
            elif before[name] != after[name]:
                yield f"{where}: {name} changed"


def _changes(old: Any, new: Any, where: str) -> Iterator[str]:
    if old == new:
        return
    if _is_identity(old) and _is_identity(new):
        yield from _identity_changes(old, new, where)
    elif isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            inner = f"{where}.{key}" if where else str(key)
            if key not in new:
                yield f"{inner} removed"
            elif key not in old:
                yield f"{inner} added"
            else:
                yield from _changes(old[key], new[key], inner)
    else:
        yield f"{where or 'value'} {_short(old)} → {_short(new)}"
