"""Lazy references to images: keep where an image lives, decode it only when it is needed.

A task's image split can be large, so :class:`~epmq.data.TaskData` holds :class:`ImageRef`
objects rather than decoded pictures. Three kinds exist, one per place images come from:

- :class:`FileImage`: an image file on disk (the ``imagefolder`` format);
- :class:`ArrayImage`: one entry of a numeric array (the ``npz`` format), shared, not copied;
- :class:`DatasetImage`: one row of a saved ``datasets`` split with an ``Image`` feature.

:meth:`ImageRef.load` returns an RGB :class:`PIL.Image.Image`; a file that cannot be decoded is
an :class:`~epmq.errors.EpmqError` naming the task and the file. :func:`load_images` loads many.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from epmq.errors import EpmqError

#: How an array entry is laid out: grey ``[H,W]``, ``[H,W,C]`` or channel-first ``[C,H,W]``.
Layout = Literal["hw", "hwc", "chw"]


class ImageRef(ABC):
    """Where one image lives; :meth:`load` decodes it."""

    @abstractmethod
    def load(self) -> Image.Image:
        """The image, converted to RGB."""

    @abstractmethod
    def describe(self) -> str:
        """Where the image lives, for messages."""

    @abstractmethod
    def digest(self) -> bytes:
        """A SHA-256 of the image's content (the file's bytes, the array entry's pixels or the
        decoded pixels): equal for identical images wherever they are stored."""


@dataclass(frozen=True)
class FileImage(ImageRef):
    """An image file (png, jpg, bmp, gif, webp, ...) read with Pillow on demand."""

    path: Path
    task: str = ""

    def load(self) -> Image.Image:
        try:
            with Image.open(self.path) as image:
                image.load()
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            prefix = f"task {self.task}: " if self.task else ""
            raise EpmqError(f"{prefix}cannot read image {self.path}: {detail}") from None

    def describe(self) -> str:
        return str(self.path)

    def digest(self) -> bytes:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError as exc:
            prefix = f"task {self.task}: " if self.task else ""
            raise EpmqError(f"{prefix}cannot read image {self.path}: {exc.strerror}") from None


@dataclass(frozen=True, eq=False)
class ArrayImage(ImageRef):
    """Entry ``index`` of a numeric image array (shared with the other entries, not copied).

    Integer arrays hold 0..255 pixels, float arrays 0..1 pixels (rounded to 8 bits on load);
    the reader checks the value range once for the whole array.
    """

    array: np.ndarray
    index: int
    layout: Layout
    where: str = ""

    def load(self) -> Image.Image:
        pixels = np.asarray(self.array[self.index])
        if self.layout == "chw":
            pixels = np.moveaxis(pixels, 0, -1)
        if np.issubdtype(pixels.dtype, np.floating):
            pixels = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        # uint8 [H,W] is read as L, [H,W,3] as RGB and [H,W,4] as RGBA.
        return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")

    def describe(self) -> str:
        return f"{self.where}[{self.index}]"

    def digest(self) -> bytes:
        return _pixel_digest(np.asarray(self.array[self.index]), self.layout)


@dataclass(frozen=True, eq=False)
class DatasetImage(ImageRef):
    """Row ``index`` of column ``column`` (an ``Image`` feature) of a ``datasets`` split."""

    dataset: Any
    index: int
    column: str
    where: str = ""
    task: str = ""

    def load(self) -> Image.Image:
        try:
            value = self.dataset[self.index][self.column]
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            prefix = f"task {self.task}: " if self.task else ""
            raise EpmqError(f"{prefix}cannot read image {self.describe()}: {exc}") from None
        if not isinstance(value, Image.Image):
            raise EpmqError(f"{self.describe()} is not an image (got {type(value).__name__})")
        return value.convert("RGB")

    def describe(self) -> str:
        return f"{self.where}[{self.index}][{self.column!r}]"

    def digest(self) -> bytes:
        image = self.load()
        return _pixel_digest(np.asarray(image), image.mode)


def _pixel_digest(pixels: np.ndarray, kind: str) -> bytes:
    """SHA-256 of an array's dtype, shape, layout and bytes."""
    digest = hashlib.sha256(f"{pixels.dtype}{pixels.shape}{kind}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.digest()


def load_images(refs: Sequence[ImageRef | Image.Image]) -> list[Image.Image]:
    """Decode ``refs`` into RGB images (PIL images given directly are converted to RGB)."""
    images = []
    for ref in refs:
        if isinstance(ref, Image.Image):
            images.append(ref.convert("RGB"))
        elif isinstance(ref, ImageRef):
            images.append(ref.load())
        else:
            raise EpmqError(f"not an image or image reference: {type(ref).__name__}")
    return images
