"""Safe outputs: every file epmq writes appears whole or not at all.

Files are written to a hidden temporary sibling and renamed into place (``os.replace`` is
atomic on POSIX). Output folders are built under a hidden ``.<name>.partial-<pid>`` sibling
and renamed when complete, so a run killed half-way never leaves a folder that looks
finished; such a folder left by a killed run (SIGKILL; the command line turns SIGINT and
SIGTERM into an exception that removes it) is removed by the next run once its process is gone,
and a resumed ``.<name>.partial`` folder is cleared of the temporary files of cut-short
writes. Files get the mode the user's umask gives. Existing outputs are never overwritten
unless the caller passes ``force=True``, and no output may equal, contain or lie inside one of
the command's inputs (:func:`refuse_overlap`), so ``--force`` can never delete a config, a
model or data.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from epmq.errors import DISK_FULL, EpmqError

# The process's umask, read once at import (reading it means setting it): files written through
# a temporary file get the mode open() would give them, not mkstemp's private 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


TEMP_SUFFIX = ".tmp"  # of the hidden ``.<name>.<random>.tmp`` file a write goes through


def partial_dir(path: str | Path) -> Path:
    """The fixed partial folder of a resumable :func:`output_dir` for ``path``."""
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def refuse_stopped_run(path: str | Path, *, resume: bool, force: bool) -> None:
    """Raise when a stopped resumable run left its partial folder and neither ``resume`` nor
    ``force`` says what to do with it."""
    partial = partial_dir(path)
    if partial.exists() and not (resume or force):
        raise EpmqError(
            f"a stopped run left {partial}; pass --resume to continue it or --force to start over"
        )


def refuse_overlap(output: str | Path, inputs: Iterable[tuple[str, str | Path]]) -> None:
    """Raise when ``output`` equals, contains or lies inside one of the labelled ``inputs``
    (``(label, path)`` pairs, e.g. ``("base model", path)``), after resolving symlinks and
    relative paths; the error names both. Call it before any work: an output replaced with
    ``force`` would otherwise delete the inputs."""
    target = Path(output).expanduser().resolve()
    for label, path in inputs:
        source = Path(path).expanduser().resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise EpmqError(
            f"output {output} {relation} the {label} {path}; choose an output apart from the inputs"
        )


def refuse_existing(path: str | Path, force: bool) -> None:
    """Raise a clear error when ``path`` exists and ``force`` is not given."""
    path = Path(path)
    if path.exists() and not force:
        raise EpmqError(f"output {path} already exists; pass --force to overwrite it")


def write_bytes(path: str | Path, data: bytes, *, force: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise EpmqError(f"cannot write {path}: {os.strerror(exc.errno)}") from None
        raise
    return path


def write_text(path: str | Path, text: str, *, force: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), force=force)


def write_json(path: str | Path, data: Any, *, force: bool = True) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", force=force)


def save_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = True,
) -> Path:
    """Save a safetensors file atomically (contiguous copies, shared storage broken)."""
    from safetensors.torch import save

    payload = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    return write_bytes(path, save(payload, metadata=dict(metadata or {})), force=force)


def remove_orphans(path: str | Path) -> list[Path]:
    """Remove the ``.<name>.partial-<pid>`` folders beside ``path`` whose process is gone (a
    run killed by SIGKILL cannot clean up after itself); returns them. A folder of
    a live process (another run building the same output) is left alone."""
    path = Path(path)
    removed = []
    for folder in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that writes cut short by SIGKILL left under ``folder`` (a
    resumable partial folder being resumed: only this run writes there); returns them."""
    stale = [p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def output_dir(
    path: str | Path, *, force: bool = False, resumable: bool = False, resume: bool = False
) -> Iterator[Path]:
    """Build an output folder atomically.

    Yields a hidden partial folder beside ``path``; on normal exit the partial folder replaces
    ``path`` (the old one is removed only then, and only with ``force``). On error the partial
    folder is deleted and ``path`` is left as it was.

    ``resumable``: the partial folder has a fixed name (``.<name>.partial``) and is *kept* when
    the run stops with an error or an interrupt, so a later call with ``resume=True`` continues
    in it (first removing the temporary files of writes a SIGKILL cut short); an existing one is
    removed only with ``force``, else refused.
    """
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        refuse_stopped_run(path, resume=resume, force=force)
        partial = partial_dir(path)
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        elif partial.exists():  # a killed run's half-written file must not reach the output
            remove_temporaries(partial)
        partial.mkdir(exist_ok=True)
    else:
        remove_orphans(path)
        partial = path.parent / f".{path.name}.partial-{os.getpid()}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    try:
        yield partial
    except BaseException:
        if not resumable:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    os.replace(partial, path)
