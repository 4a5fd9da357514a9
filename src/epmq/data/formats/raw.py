"""What a format reader is given (:class:`Request`) and what it returns (:class:`RawData`).

A reader only reads: it returns each split's inputs and its labels exactly as stored (ints or
strings), plus the class names when the data itself names them (a ``ClassLabel`` feature,
image sub-folders). :mod:`epmq.data.labels` then settles the classes and maps the labels, the
same way for every format. Helpers shared by the folder-of-split-files formats live here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from epmq.data.examples import Modality
from epmq.data.image_refs import FileImage, ImageRef
from epmq.errors import EpmqError

#: Split names a reader returns; ``train`` and ``test`` are required.
SPLITS = ("train", "test", "calib")

RawLabel = int | str


@dataclass(frozen=True)
class Request:
    """One task's data request: where, in which columns, with which class names (if given)."""

    task: str
    path: Path
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    classes: tuple[str, ...] | None = None
    allow_pickle: bool = False  # npz object arrays: unpickling can run code from the file

    def fail(self, message: str, where: str | Path | None = None) -> EpmqError:
        """A one-line error naming the task and the file (``where``, else the data path)."""
        place = where if where is not None else self.path
        return EpmqError(" ".join(f"task {self.task}: {place}: {message}".splitlines()))


@dataclass(frozen=True)
class RawSplit:
    """A split as stored: ``where`` names its file; ``lines[i]`` is example i's line, if known."""

    inputs: Sequence[str] | Sequence[ImageRef]
    labels: Sequence[RawLabel]
    where: str
    lines: Sequence[int] | None = None

    def locate(self, index: int) -> str:
        """``file:line`` (or ``file, example N``) for example ``index``."""
        if self.lines is not None:
            return f"{self.where}:{self.lines[index]}"
        source = self.inputs[index]
        if isinstance(source, FileImage):  # an image folder: the file says it all
            return source.describe()
        return f"{self.where}, example {index + 1}"


@dataclass(frozen=True)
class RawData:
    """A format reader's result: the splits present and the classes the data names, if any."""

    modality: Modality
    splits: dict[str, RawSplit]
    classes: tuple[str, ...] | None = None


def split_files(request: Request, suffix: str) -> dict[str, Path]:
    """``{split: file}`` for a folder holding ``train<suffix>``, ``test<suffix>`` and optionally
    ``calib<suffix>``, with clear errors for a missing folder or split file."""
    folder = request.path
    if not folder.exists():
        raise request.fail("does not exist")
    if not folder.is_dir():
        raise request.fail(f"is not a folder (expected one holding train{suffix} and test{suffix})")
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == suffix)
    if not found:
        raise request.fail(f"holds no {suffix} files (expected train{suffix} and test{suffix})")
    files = {}
    for split in SPLITS:
        path = folder / f"{split}{suffix}"
        if path.is_file():
            files[split] = path
        elif split != "calib":
            raise request.fail(f"has no {split}{suffix} (found: {', '.join(found)})")
    return files


def read_text_file(request: Request, path: Path) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped), with a clear error otherwise."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise request.fail(f"is not UTF-8 text ({exc.reason})", path) from None
    except OSError as exc:
        raise request.fail(f"cannot be read ({exc.strerror or exc})", path) from None


def cell_label(request: Request, value: object, where: str) -> RawLabel:
    """A stored label as an int or a string (whole floats count as ints; bools do not)."""
    if isinstance(value, bool) or value is None:
        raise request.fail(f"label {value!r} is neither an integer nor a class name", where)
    if isinstance(value, int | str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise request.fail(f"label {value!r} is neither an integer nor a class name", where)
