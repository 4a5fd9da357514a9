"""The ``npz`` format: one ``.npz`` file with ``x_train, y_train, x_test, y_test`` and optionally
``x_calib, y_calib``.

``x`` arrays of strings (numpy unicode, bytes or object arrays of ``str``) are texts. Numeric
``x`` arrays are images, one per first-axis entry:

- ``[N,H,W]``: grey;
- ``[N,H,W,C]`` with C in 1, 3, 4 (grey, RGB, RGBA): uint8 (0..255) or float (0..1) pixels;
- ``[N,C,H,W]`` with C in 1, 3: channel-first pixels (float 0..1, as ``ToTensor`` writes them).

Pixel values are checked once per array: they must be unnormalised (epmq resizes and normalises
images itself, see :class:`epmq.data.images.ImagePreprocessing`). ``y`` arrays hold integer
class indices or class names. Object arrays can only be read by unpickling them, which runs
whatever code the file holds: they are refused unless the task sets ``allow_pickle`` (strings
stored as numpy unicode arrays, ``np.array(texts, dtype=str)``, need no pickle).
"""

from __future__ import annotations

import zipfile
from typing import Any

import numpy as np

from epmq.data.examples import Modality
from epmq.data.formats.raw import SPLITS, RawData, RawLabel, RawSplit, Request
from epmq.data.image_refs import ArrayImage, Layout


def read_npz(request: Request) -> RawData:
    """Read the arrays of an ``npz`` task file."""
    path = request.path
    if not path.exists():
        raise request.fail("does not exist")
    if path.is_dir():
        raise request.fail("is a folder; the npz format reads one .npz file")
    arrays = _load(request)
    names = ", ".join(sorted(arrays)) or "none"
    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key not in arrays:
            raise request.fail(f"has no array {key!r} (arrays: {names})")
    if ("x_calib" in arrays) != ("y_calib" in arrays):
        raise request.fail(f"has only one of 'x_calib' and 'y_calib' (arrays: {names})")
    splits: dict[str, RawSplit] = {}
    modalities: dict[str, Modality] = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        for name, array in ((f"x_{split}", x), (f"y_{split}", y)):
            if array.ndim == 0:
                raise request.fail(f"{name} is a single value, not an array of examples")
        if len(x) != len(y):
            raise request.fail(f"x_{split} has {len(x)} entries but y_{split} has {len(y)}")
        modalities[split], inputs = _inputs(request, x, f"x_{split}")
        labels = _labels(request, y, f"y_{split}")
        splits[split] = RawSplit(inputs, labels, f"{path} [y_{split}]")
    if len(set(modalities.values())) > 1:
        kinds = ", ".join(f"x_{s}: {m}" for s, m in modalities.items())
        raise request.fail(f"mixes text and image splits ({kinds})")
    return RawData(modalities["train"], splits)


def _load(request: Request) -> dict[str, np.ndarray]:
    """Every array of the file (object arrays are unpickled on a second open, and only with
    ``request.allow_pickle``)."""
    try:
        data = np.load(request.path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise request.fail(f"is not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise request.fail("is a single .npy array, not an .npz archive")
    with data:
        arrays = {}
        for key in data.files:
            try:
                arrays[key] = data[key]
            except ValueError:  # an object array: needs pickle
                if not request.allow_pickle:
                    raise request.fail(
                        f"array {key!r} is an object array, which only pickle reads (it can run "
                        "code); store strings as a numpy unicode array (np.array(texts, "
                        "dtype=str)), or set allow_pickle: true on the task if you trust the file"
                    ) from None
                arrays[key] = _load_object_array(request, key)
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise request.fail(f"array {key!r} cannot be read ({exc})") from None
    return arrays


def _load_object_array(request: Request, key: str) -> np.ndarray:
    with np.load(request.path, allow_pickle=True) as data:
        return data[key]


def _inputs(request: Request, x: np.ndarray, name: str) -> tuple[Modality, list[Any]]:
    if x.dtype.kind in "UOS":
        if x.ndim != 1:
            raise request.fail(f"{name} holds strings but has shape {list(x.shape)}, not [N]")
        texts = [v.decode("utf-8") if isinstance(v, bytes) else v for v in x.tolist()]
        bad = next((v for v in texts if not isinstance(v, str)), None)
        if bad is not None:
            raise request.fail(f"{name} holds a {type(bad).__name__}, not only strings")
        return "text", texts
    if x.dtype.kind not in "iuf":
        raise request.fail(f"{name} has dtype {x.dtype}: expected strings or numeric pixels")
    layout = _layout(request, x, name)
    _check_range(request, x, name, layout)
    where = f"{request.path} [{name}]"
    return "image", [ArrayImage(x, i, layout, where) for i in range(len(x))]


def _layout(request: Request, x: np.ndarray, name: str) -> Layout:
    shape = list(x.shape)
    if x.ndim == 3:
        return "hw"
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        return "hwc"
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return "chw"
    raise request.fail(
        f"{name} has shape {shape}; images must be [N,H,W], [N,H,W,C] (C in 1,3,4) "
        "or [N,C,H,W] (C in 1,3)"
    )


def _check_range(request: Request, x: np.ndarray, name: str, layout: Layout) -> None:
    if x.size == 0:
        return
    low, high = float(np.min(x)), float(np.max(x))
    if x.dtype.kind == "f":
        if not (np.isfinite(low) and np.isfinite(high)):
            raise request.fail(f"{name} holds NaN or infinite pixel values")
        if low < -1e-6 or high > 1 + 1e-6:
            hint = (
                "unnormalised 0..1 pixels (epmq normalises them itself)"
                if layout == "chw"
                else "0..1 pixels (or store uint8 0..255)"
            )
            raise request.fail(f"{name} holds values in {low:g}..{high:g}; expected {hint}")
    elif low < 0 or high > 255:
        raise request.fail(f"{name} holds values in {low:g}..{high:g}; expected 0..255 pixels")


def _labels(request: Request, y: np.ndarray, name: str) -> list[RawLabel]:
    if y.ndim != 1:
        raise request.fail(f"{name} has shape {list(y.shape)}, not [N]")
    if y.dtype.kind in "iu":
        return [int(v) for v in y.tolist()]
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise request.fail(f"{name} holds fractional labels; expected class indices")
        return [int(v) for v in y.tolist()]
    if y.dtype.kind in "UOS":
        values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in y.tolist()]
        out: list[RawLabel] = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise request.fail(f"{name} holds a label {value!r}; expected ints or names")
            out.append(value)
        return out
    raise request.fail(f"{name} has dtype {y.dtype}; expected integer labels or class names")
