"""The ``imagefolder`` format: ``train/<class>/*.png``, ``test/<class>/...``, optional ``calib/``.

Image files (png, jpg, jpeg, bmp, gif, webp, any letter case) are listed, not opened: the
examples hold :class:`~epmq.data.image_refs.FileImage` references, decoded on demand. The
classes are the sorted sub-folder names of ``train/``, or the ``classes`` the task gives (each
of them must then be a sub-folder of ``train/``). A split need not hold every class; a
sub-folder that is not a class is an error. Hidden files and other files are skipped; examples
are ordered by class folder, then file name.
"""

from __future__ import annotations

from pathlib import Path

from epmq.data.formats.raw import SPLITS, RawData, RawSplit, Request
from epmq.data.image_refs import FileImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_image_folder(request: Request) -> RawData:
    """List the images of an ``imagefolder`` task."""
    root = request.path
    if not root.exists():
        raise request.fail("does not exist")
    if not root.is_dir():
        raise request.fail("is not a folder (expected train/<class>/ and test/<class>/ inside)")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p))
    if not any(split in present for split in SPLITS):
        found = ", ".join(present) or "none"
        raise request.fail(
            f"holds no train/ or test/ folders of class sub-folders (folders: {found})"
        )
    for split in ("train", "test"):
        if split not in present:
            raise request.fail(f"has no {split}/ folder (folders: {', '.join(present)})")
    folders = _class_folders(request, root / "train")
    classes = request.classes if request.classes is not None else tuple(folders)
    missing = [c for c in classes if c not in folders]
    if missing:
        raise request.fail(
            f"classes {missing} have no sub-folder (sub-folders: {folders})", root / "train"
        )
    splits = {split: _read_split(request, root / split) for split in SPLITS if split in present}
    return RawData("image", splits, classes)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _class_folders(request: Request, folder: Path) -> list[str]:
    names = []
    for path in sorted(folder.iterdir()):
        if _hidden(path):
            continue
        if path.is_dir():
            names.append(path.name)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise request.fail(
                f"image {path.name} is not inside a class sub-folder (use {folder.name}/<class>/)",
                folder,
            )
    return names


def _read_split(request: Request, folder: Path) -> RawSplit:
    refs: list[FileImage] = []
    labels: list[str] = []
    for name in _class_folders(request, folder):
        for path in sorted((folder / name).iterdir()):
            if path.is_file() and not _hidden(path) and path.suffix.lower() in IMAGE_SUFFIXES:
                refs.append(FileImage(path, request.task))
                labels.append(name)
    return RawSplit(refs, labels, str(folder))
