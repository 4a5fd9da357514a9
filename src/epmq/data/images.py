"""CLIP-style image preprocessing with Pillow and torch (no torchvision needed).

:class:`ImagePreprocessing` turns images into the ``pixel_values`` a CLIP vision encoder takes,
the way ``transformers.CLIPImageProcessor`` does it: convert to the model's channels (RGB, or
grey "L" for a model with ``num_channels: 1``), resize so the shortest edge is ``size``
(bicubic; the long edge is ``int(size * long / short)``), center-crop a
``crop_size`` square (zero-padded when the image is smaller), multiply by ``rescale_factor``
and normalise with ``mean`` and ``std`` (one number per channel). Pillow does the resizing, as
the processor's PIL backend does, so results match it up to float rounding. Colour images given
to a grey model become grey by Pillow's luma transform (L = 0.299 R + 0.587 G + 0.114 B); grey
images given to a colour model are repeated over R, G and B. A ``ViTImageProcessor`` config
(``size: {height: N, width: N}``, no crop) resizes the whole image to N × N instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from epmq.data.image_refs import ImageRef, load_images
from epmq.errors import EpmqError

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "preprocessor_config.json"
BICUBIC = int(Image.Resampling.BICUBIC)
#: the Pillow mode images are converted to, per number of channels the model takes
MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize (shortest edge ``size``), center-crop ``crop_size``, rescale, normalise.

    ``size=None`` skips the resize and ``crop_size=None`` the crop (images must then come out
    the same size to be stacked). ``resample`` is a Pillow resampling filter (bicubic).
    ``num_channels`` (the vision config's: 1 grey, 3 RGB) is what images become; ``mean`` and
    ``std`` hold one number per channel.
    """

    size: int | None = 224
    crop_size: int | None = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    num_channels: int = 3
    #: resize to ``size`` × ``size`` whatever the aspect (ViTImageProcessor's
    #: ``{height, width}``) instead of the shortest edge to ``size``
    square_resize: bool = False

    def __post_init__(self) -> None:
        for name in ("size", "crop_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise EpmqError(f"image preprocessing: {name} must be an integer, got {value!r}")
            if value is not None and value < 1:
                raise EpmqError(f"image preprocessing: {name} must be >= 1, got {value}")
        if self.num_channels not in MODES:
            raise EpmqError(
                f"image preprocessing: num_channels {self.num_channels!r} is not supported "
                "(1: grey, 3: RGB)"
            )
        count = self.num_channels
        for name in ("mean", "std"):
            values = tuple(getattr(self, name))
            if len(values) != count or not all(isinstance(v, int | float) for v in values):
                raise EpmqError(
                    f"image preprocessing: {name} must be {_numbers(count)}, one per channel "
                    f"of the model's images (num_channels {count}), got {list(values)!r}"
                )
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(s <= 0 for s in self.std):
            raise EpmqError(f"image preprocessing: std must be > 0, got {list(self.std)}")

    @classmethod
    def from_dict(
        cls, block: Mapping[str, Any], where: str = "image preprocessing", num_channels: int = 3
    ) -> ImagePreprocessing:
        """From a config block ``{size, crop_size, mean, std}``, for a model taking
        ``num_channels`` channels.

        ``crop_size`` defaults to ``size`` and ``size`` to ``crop_size`` (one is required);
        ``mean`` and ``std`` default to CLIP's for an RGB model (a grey one needs its own).
        """
        if not isinstance(block, Mapping):
            raise EpmqError(f"{where}: expected a mapping of size, crop_size, mean, std")
        known = {"size", "crop_size", "mean", "std"}
        unknown = sorted(set(block) - known)
        if unknown:
            raise EpmqError(f"{where}: unknown field(s) {unknown} (known: {sorted(known)})")
        size, crop = block.get("size"), block.get("crop_size")
        if size is None and crop is None:
            raise EpmqError(f"{where}: give size (and crop_size) of the images")
        try:
            mean = _statistics(block.get("mean"), CLIP_MEAN, "mean", num_channels)
            std = _statistics(block.get("std"), CLIP_STD, "std", num_channels)
            return cls(
                size=size if size is not None else crop,
                crop_size=crop if crop is not None else size,
                mean=tuple(mean),
                std=tuple(std),
                num_channels=num_channels,
            )
        except TypeError:
            raise EpmqError(f"{where}: mean and std must be lists of 3 numbers") from None
        except EpmqError as exc:
            raise EpmqError(f"{where}: {_detail(exc)}") from None

    @classmethod
    def from_folder(cls, model_dir: str | Path, num_channels: int = 3) -> ImagePreprocessing | None:
        """From ``preprocessor_config.json`` in ``model_dir`` as ``CLIPImageProcessor`` writes
        it, for a model taking ``num_channels`` channels; None when the folder has no such
        file. Missing fields take CLIP's defaults (an RGB model's; a grey one needs its own)."""
        path = Path(model_dir) / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError, RecursionError) as exc:
            raise EpmqError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(config, dict):
            raise EpmqError(f"{path}: expected a JSON object")
        size, square = _edge(config.get("size", 224), path, "size")
        crop = _crop(config.get("crop_size", 224), path)
        # ViTImageProcessor resizes to {height, width} and writes no crop: none by default
        center_crop = config.get("do_center_crop", not square)
        normalise = config.get("do_normalize", True)
        rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
        count = num_channels
        try:
            if normalise:
                mean = _statistics(config.get("image_mean"), CLIP_MEAN, "image_mean", count)
                std = _statistics(config.get("image_std"), CLIP_STD, "image_std", count)
            else:
                mean, std = [0.0] * count, [1.0] * count
            return cls(
                size=size if config.get("do_resize", True) else None,
                crop_size=crop if center_crop else None,
                mean=tuple(mean),
                std=tuple(std),
                rescale_factor=float(rescale),
                resample=int(config.get("resample", BICUBIC)),
                num_channels=count,
                square_resize=square,
            )
        except (EpmqError, TypeError, ValueError) as exc:
            raise EpmqError(f"{path}: {_detail(exc)}") from None

    def pixel_values(self, images: Sequence[Image.Image | ImageRef]) -> torch.Tensor:
        """``[N, num_channels, crop, crop]`` float32 pixel values for ``images`` (refs are
        loaded)."""
        import torch  # imported here so that reading task data does not load torch

        if not images:
            raise EpmqError("no images to preprocess")
        # one image at a time: only the cropped pixels of the batch are held
        arrays = [self._one(load_images([image])[0]) for image in images]
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            raise EpmqError(
                f"images come out in different sizes {[list(s) for s in shapes[:3]]}; "
                "set crop_size so they can be stacked"
            )
        stacked = np.stack(arrays)
        if stacked.ndim == 3:  # grey: [N, H, W] -> [N, H, W, 1]
            stacked = stacked[..., None]
        pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2).to(torch.float32)
        pixels = pixels * self.rescale_factor
        channels = (1, self.num_channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(channels)
        std = torch.tensor(self.std, dtype=torch.float32).view(channels)
        return ((pixels - mean) / std).contiguous()

    def _one(self, image: Image.Image) -> np.ndarray:
        """Convert one image to the model's channels, resize and crop it; ``[H, W, 3]`` (RGB)
        or ``[H, W]`` (grey) uint8."""
        image = image.convert(MODES[self.num_channels])
        if self.size is not None and self.square_resize:
            image = image.resize((self.size, self.size), resample=self.resample)
        elif self.size is not None:
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.size * long / short)
            new = (self.size, new_long) if width <= height else (new_long, self.size)
            image = image.resize(new, resample=self.resample)
        if self.crop_size is not None:
            width, height = image.size
            top = (height - self.crop_size) // 2
            left = (width - self.crop_size) // 2
            # Pillow fills the part of the box outside the image with zeros, as the processor pads.
            image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return np.asarray(image, dtype=np.uint8)

    def check_model_size(self, image_size: int, where: str) -> None:
        """Fail when images come out at a size other than the model's ``image_size``.

        Without a crop the output size depends on each image, so there is nothing to check.
        """
        side = self.crop_size
        if side is None and self.square_resize:
            side = self.size
        if side is not None and side != image_size:
            raise EpmqError(
                f"{where}: images are preprocessed to {side}×{side} but the model takes "
                f"{image_size}×{image_size} (vision_config.image_size)"
            )


def _edge(value: Any, path: Path, field: str) -> tuple[int, bool]:
    """``size`` as written by CLIPImageProcessor (an int or ``{"shortest_edge": N}``: the
    shortest edge) or by ViTImageProcessor (a square ``{"height": N, "width": N}``: the whole
    image); the size and whether it is the whole image's."""
    if isinstance(value, Mapping):
        given = {k for k, v in value.items() if v is not None}
        if given == {"shortest_edge"}:
            return int(value["shortest_edge"]), False
        if given == {"height", "width"} and value["height"] == value["width"]:
            return int(value["height"]), True
        raise EpmqError(
            f"{path}: {field} {dict(value)} is not supported; "
            "only shortest-edge ({'shortest_edge': N}) and square ({'height': N, 'width': N}) "
            "resizing are"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        return value, False
    raise EpmqError(f"{path}: {field} must be an integer or {{'shortest_edge': N}}, got {value!r}")


def _crop(value: Any, path: Path) -> int:
    """``crop_size``: an int or a square ``{"height": H, "width": W}``."""
    if isinstance(value, Mapping):
        height, width = value.get("height"), value.get("width")
        if height is None or width is None or height != width:
            raise EpmqError(f"{path}: crop_size {dict(value)} is not a square height × width")
        return int(height)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise EpmqError(f"{path}: crop_size must be an integer or {{height, width}}, got {value!r}")


def _numbers(count: int) -> str:
    return f"{count} number" if count == 1 else f"{count} numbers"


def _statistics(value: Any, default: Sequence[float], field: str, num_channels: int) -> Any:
    """A normalisation ``mean`` or ``std`` (``field``) for a model taking ``num_channels``
    channels: the value given (one number per channel), else CLIP's RGB ``default`` for an RGB
    model. A grey model given RGB statistics (or none) is refused, naming the field."""
    kind = "grey" if num_channels == 1 else f"{num_channels}-channel"
    fix = f"give the statistics its images were normalised with (e.g. {[0.5] * num_channels})"
    if value is None:
        if num_channels == len(default):
            return default
        raise EpmqError(
            f"{field} is not given, and the model takes {kind} images (num_channels "
            f"{num_channels}): {fix}"
        )
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) != num_channels:
        raise EpmqError(
            f"{field} must be {_numbers(num_channels)}, one per channel of the model's {kind} "
            f"images (num_channels {num_channels}), not {len(value)}: {fix}"
        )
    return value


def _detail(exc: Exception) -> str:
    """An error's message without the generic prefix, to put a file or block name before it."""
    return str(exc).removeprefix("image preprocessing: ")
