"""ImagePreprocessing: CLIP-style pixel values without torchvision, checked against transformers.

The reference is transformers' PIL backend of ``CLIPImageProcessor`` (``CLIPImageProcessorPil``;
without torchvision, ``CLIPImageProcessor`` itself falls back to it). Both resize with Pillow's
bicubic filter and crop with the same arithmetic, so the results agree to float rounding
(measured max difference ~5e-7). The torchvision backend resizes with torch's bicubic kernel
instead, which is not the same filter, so it is not the reference here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from task_data_files import image_folder, random_rgb, save_png

from epmq.data import CLIP_MEAN, CLIP_STD, FileImage, ImagePreprocessing, read_task_data
from epmq.errors import EpmqError

transformers = pytest.importorskip("transformers")


def _reference_processor(**kwargs: object) -> object:
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kwargs)


@pytest.mark.parametrize(
    ("height", "width", "size", "crop"),
    [(57, 45, 40, 32), (45, 57, 40, 32), (30, 30, 24, 24), (20, 50, 16, 20), (33, 70, 64, 48)],
)
def test_matches_clip_image_processor(
    tmp_path: Path, height: int, width: int, size: int, crop: int
) -> None:
    image = Image.fromarray(random_rgb(height * width, height, width))
    processor = _reference_processor(
        size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}
    )
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    processor.save_pretrained(str(tmp_path))
    ours = ImagePreprocessing.from_folder(tmp_path)
    assert ours is not None and (ours.size, ours.crop_size) == (size, crop)
    got = ours.pixel_values([image])
    assert got.shape == (1, 3, crop, crop) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-4


def test_refs_grey_and_rgba_become_rgb(tmp_path: Path) -> None:
    prep = ImagePreprocessing(size=8, crop_size=8)
    ref = FileImage(save_png(tmp_path / "a.png", (10, 20, 30), size=(12, 9)))
    grey = Image.new("L", (9, 9), 100)
    rgba = Image.new("RGBA", (9, 9), (100, 100, 100, 0))
    pixels = prep.pixel_values([ref, grey, rgba])
    assert pixels.shape == (3, 3, 8, 8)
    assert torch.allclose(pixels[1], pixels[2])
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[0, :, 4, 4], (torch.tensor([10, 20, 30]) / 255 - mean) / std)


def test_from_dict_defaults_and_values() -> None:
    prep = ImagePreprocessing.from_dict({"size": 32})
    assert (prep.size, prep.crop_size, prep.mean, prep.std) == (32, 32, CLIP_MEAN, CLIP_STD)
    prep = ImagePreprocessing.from_dict(
        {"size": 40, "crop_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    )
    assert prep.crop_size == 32 and prep.mean == (0.5,) * 3 and prep.std == (0.25,) * 3
    assert ImagePreprocessing.from_dict({"crop_size": 16}).size == 16


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({}, "give size"),
        ([32], "expected a mapping"),
        ({"size": 32, "resize": 1}, r"unknown field\(s\) \['resize'\]"),
        ({"size": 0}, "size must be >= 1"),
        ({"size": "big"}, "size must be an integer"),
        ({"size": 32, "mean": [0.5, 0.5]}, "mean must be 3 numbers"),
        ({"size": 32, "std": 1}, "mean and std must be lists of 3 numbers"),
        ({"size": 32, "std": [1, 0, 1]}, "std must be > 0"),
    ],
)
def test_from_dict_errors(block: object, message: str) -> None:
    with pytest.raises(EpmqError, match=f"^task x images: {message}"):
        ImagePreprocessing.from_dict(block, where="task x images")  # type: ignore[arg-type]


def _write_config(folder: Path, **config: object) -> Path:
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return folder


def test_from_folder_fields(tmp_path: Path) -> None:
    assert ImagePreprocessing.from_folder(tmp_path) is None
    prep = ImagePreprocessing.from_folder(_write_config(tmp_path, size=48, crop_size=40))
    assert prep is not None and (prep.size, prep.crop_size, prep.mean) == (48, 40, CLIP_MEAN)
    prep = ImagePreprocessing.from_folder(
        _write_config(
            tmp_path, do_resize=False, do_center_crop=False, do_normalize=False, do_rescale=False
        )
    )
    assert prep is not None and prep.size is None and prep.crop_size is None
    assert prep.mean == (0.0,) * 3 and prep.std == (1.0,) * 3 and prep.rescale_factor == 1.0
    image = Image.fromarray(random_rgb(1, 5, 7))
    values = prep.pixel_values([image])
    assert torch.equal(values[0], torch.from_numpy(np.array(image)).permute(2, 0, 1).float())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"size": {"height": 224, "width": 200}}, "only shortest-edge .* resizing"),
        ({"size": {"shortest_edge": 224, "longest_edge": 300}}, "only shortest-edge .* resizing"),
        ({"crop_size": {"height": 224, "width": 200}}, "is not a square"),
        ({"image_std": [1, 1]}, "std must be 3 numbers"),
    ],
)
def test_from_folder_errors(tmp_path: Path, config: dict[str, object], message: str) -> None:
    _write_config(tmp_path, **config)
    with pytest.raises(EpmqError, match=message) as info:
        ImagePreprocessing.from_folder(tmp_path)
    assert str(tmp_path / "preprocessor_config.json") in str(info.value)
    (tmp_path / "preprocessor_config.json").write_text("{nope")
    with pytest.raises(EpmqError, match="not a readable JSON file"):
        ImagePreprocessing.from_folder(tmp_path)


def test_uncropped_images_of_different_sizes() -> None:
    prep = ImagePreprocessing(size=8, crop_size=None)
    square = Image.new("RGB", (10, 10))
    assert prep.pixel_values([square, square]).shape == (2, 3, 8, 8)
    with pytest.raises(EpmqError, match="come out in different sizes"):
        prep.pixel_values([square, Image.new("RGB", (10, 20))])
    with pytest.raises(EpmqError, match="no images"):
        prep.pixel_values([])


def test_check_model_size() -> None:
    prep = ImagePreprocessing(size=64, crop_size=64)
    prep.check_model_size(64, "task pets")
    with pytest.raises(EpmqError) as info:
        prep.check_model_size(32, "task pets")
    assert str(info.value) == (
        "task pets: images are preprocessed to 64×64 but the model takes 32×32 "
        "(vision_config.image_size)"
    )


def test_pixel_values_of_read_task_data(tmp_path: Path) -> None:
    data = read_task_data("pets", image_folder(tmp_path), "imagefolder")
    prep = ImagePreprocessing.from_dict({"size": 4})
    prep.check_model_size(4, "task pets")
    chosen = data.calibration(3, seed=0)
    assert prep.pixel_values(chosen.inputs).shape == (3, 3, 4, 4)
