"""Image tasks from npz arrays and image folders: layouts, lazy references, decoding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from task_data_files import image_folder, random_rgb, save_png

from epmq.data import ArrayImage, FileImage, ImageRef, load_images, read_task_data
from epmq.errors import EpmqError


def _npz(path: Path, x_train: np.ndarray, x_test: np.ndarray, **extra: np.ndarray) -> Path:
    y_train = np.arange(len(x_train)) % 2
    np.savez(
        path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=[1] * len(x_test), **extra
    )
    return path


def test_npz_grey_images(tmp_path: Path) -> None:
    x = np.stack([np.full((4, 5), v, np.uint8) for v in (0, 128, 255)])
    data = read_task_data("g", _npz(tmp_path / "g.npz", x, x[:1]), "npz")
    assert data.modality == "image" and data.classes == ("0", "1")
    assert all(isinstance(ref, ArrayImage) for ref in data.train.inputs)
    images = load_images(data.train.inputs)
    assert images[1].mode == "RGB" and images[1].size == (5, 4)
    assert np.asarray(images[1])[0, 0].tolist() == [128, 128, 128]


def test_npz_hwc_uint8_and_rgba(tmp_path: Path) -> None:
    rgb = np.stack([random_rgb(i, 6, 7) for i in range(2)])
    rgba = np.concatenate([rgb, np.full((2, 6, 7, 1), 255, np.uint8)], axis=-1)
    data = read_task_data("c", _npz(tmp_path / "c.npz", rgb, rgba[:1]), "npz")
    assert np.array_equal(np.asarray(data.train.inputs[1].load()), rgb[1])
    assert np.array_equal(np.asarray(data.test.inputs[0].load()), rgb[0])


def test_npz_float_hwc_and_chw_match_uint8(tmp_path: Path) -> None:
    rgb = np.stack([random_rgb(i, 5, 6) for i in range(2)])
    hwc = rgb.astype(np.float32) / 255
    chw = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    data = read_task_data("f", _npz(tmp_path / "f.npz", hwc, chw), "npz")
    assert np.array_equal(np.asarray(data.train.inputs[1].load()), rgb[1])
    assert np.array_equal(np.asarray(data.test.inputs[0].load()), rgb[0])


def test_npz_single_channel_hwc(tmp_path: Path) -> None:
    x = np.full((2, 3, 3, 1), 0.5, np.float64)
    data = read_task_data("s", _npz(tmp_path / "s.npz", x, x), "npz")
    assert np.asarray(data.train.inputs[0].load())[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.full((2, 3, 3, 3), 2.0, np.float32), r"values in 2\.\.2; expected 0\.\.1 pixels"),
        (np.full((2, 3, 5, 5), -1.0), "expected unnormalised 0..1 pixels"),
        (np.full((2, 3, 3), 300, np.int32), r"expected 0\.\.255 pixels"),
        (np.zeros((2, 5, 6, 6)), r"images must be \[N,H,W\]"),
        (np.zeros((2, 2, 2, 2, 2)), r"has shape \[2, 2, 2, 2, 2\]"),
        (np.array([[1.0, np.nan, 0, 0]]).reshape(1, 2, 2).repeat(2, 0), "NaN"),
    ],
)
def test_npz_bad_image_arrays(tmp_path: Path, x: np.ndarray, message: str) -> None:
    with pytest.raises(EpmqError, match=message):
        read_task_data("b", _npz(tmp_path / "b.npz", x, x), "npz")


def test_npz_text_and_image_splits_do_not_mix(tmp_path: Path) -> None:
    path = _npz(tmp_path / "m.npz", np.zeros((2, 3, 3), np.uint8), np.array(["a"]))
    with pytest.raises(EpmqError, match="mixes text and image splits"):
        read_task_data("m", path, "npz")


def test_image_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "pets", calib=True)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    data = read_task_data("pets", root, "imagefolder")
    assert data.modality == "image" and data.classes == ("cat", "dog")
    assert data.train.labels == (0, 0, 1, 1) and data.test.labels == (0, 1)
    assert data.calib is not None and len(data.calib) == 2
    refs = data.train.inputs
    assert all(isinstance(r, FileImage) for r in refs)
    assert [r.path.name for r in refs] == ["0.png", "1.png", "0.jpg", "1.jpg"]  # lazy: paths
    red, blue = load_images([refs[0], refs[2]])
    assert red.getpixel((0, 0)) == (255, 0, 0)
    assert blue.mode == "RGB" and blue.size == (6, 5)


def test_image_folder_given_classes_order(tmp_path: Path) -> None:
    data = read_task_data("p", image_folder(tmp_path), "imagefolder", classes=["dog", "cat"])
    assert data.classes == ("dog", "cat") and data.train.labels == (1, 1, 0, 0)


def test_image_folder_test_may_lack_a_class(tmp_path: Path) -> None:
    root = image_folder(tmp_path)
    for path in (root / "test" / "dog").iterdir():
        path.unlink()
    (root / "test" / "dog").rmdir()
    assert read_task_data("p", root, "imagefolder").test.labels == (0,)


def test_image_folder_given_class_without_folder(tmp_path: Path) -> None:
    with pytest.raises(EpmqError, match=r"classes \['bird'\] have no sub-folder"):
        read_task_data("p", image_folder(tmp_path), "imagefolder", classes=["cat", "dog", "bird"])


def test_image_folder_folder_outside_given_classes(tmp_path: Path) -> None:
    with pytest.raises(EpmqError) as info:
        read_task_data("p", image_folder(tmp_path), "imagefolder", classes=["cat"])
    message = str(info.value)
    assert "label 'dog' is not one of the 1 classes ['cat']" in message
    assert str(tmp_path / "train" / "dog" / "0.jpg") in message


def test_image_folder_image_outside_class_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path)
    save_png(root / "test" / "stray.png", (0, 0, 0))
    with pytest.raises(EpmqError, match=r"image stray\.png is not inside a class sub-folder"):
        read_task_data("p", root, "imagefolder")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = image_folder(tmp_path)
    broken = root / "train" / "cat" / "2.png"
    broken.write_bytes(b"not a png at all")
    data = read_task_data("pets", root, "imagefolder")  # listing does not decode
    with pytest.raises(EpmqError, match=re.escape(f"task pets: cannot read image {broken}")):
        load_images(data.train.inputs)


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(random_rgb(0, 64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EpmqError, match=re.escape(f"cannot read image {path}")):
        FileImage(path, "t").load()


def test_load_images_accepts_pil_and_rejects_other(tmp_path: Path) -> None:
    grey = Image.new("L", (2, 2), 7)
    assert load_images([grey])[0].mode == "RGB"
    with pytest.raises(EpmqError, match="not an image or image reference"):
        load_images(["a path"])  # type: ignore[list-item]


def test_refs_are_image_refs(tmp_path: Path) -> None:
    ref = FileImage(save_png(tmp_path / "a.png", (1, 2, 3)))
    assert isinstance(ref, ImageRef) and ref.describe() == str(tmp_path / "a.png")


def test_npz_image_label_error_names_the_label_array(tmp_path: Path) -> None:
    x = np.zeros((2, 3, 3), np.uint8)
    path = tmp_path / "l.npz"
    np.savez(path, x_train=x, y_train=[0, 1], x_test=x, y_test=[0, 7])
    with pytest.raises(EpmqError) as info:
        read_task_data("l", path, "npz", classes=["a", "b"])
    assert f"{path} [y_test], example 2: label 7 is not one of the 2 classes" in str(info.value)
