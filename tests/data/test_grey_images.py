"""Grey vision models (``num_channels: 1``): images of either kind become what the model takes,
and normalisation statistics must have one entry per channel; and ViT processor configs'
square resize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epmq.data import ArrayImage, FileImage, ImagePreprocessing
from epmq.errors import EpmqError

transformers = pytest.importorskip("transformers")

GREY = {"mean": (0.5,), "std": (0.25,), "num_channels": 1}


def grey_pixels(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def test_grey_images_match_the_clip_image_processor() -> None:
    image = Image.fromarray(grey_pixels(0, 23, 29))
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    reference = cls(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
        image_mean=[0.5], image_std=[0.25], do_convert_rgb=False,
    )  # fmt: skip
    want = reference(images=[image], return_tensors="pt")["pixel_values"]
    got = ImagePreprocessing(size=16, crop_size=16, **GREY).pixel_values([image])
    assert got.shape == (1, 1, 16, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_every_layout_becomes_the_same_grey_pixels(tmp_path: Path) -> None:
    pixels = grey_pixels(1, 8, 8)
    prep = ImagePreprocessing(size=None, crop_size=None, **GREY)
    want = ((torch.from_numpy(pixels).float() / 255 - 0.5) / 0.25).view(1, 1, 8, 8)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "rgb.png")  # grey stored as RGB
    refs = [
        ArrayImage(pixels[None], 0, "hw"),
        ArrayImage(pixels[None, :, :, None], 0, "hwc"),
        ArrayImage(pixels[None, None].astype(np.float32) / 255, 0, "chw"),
        FileImage(tmp_path / "grey.png"),
        FileImage(tmp_path / "rgb.png"),
    ]
    for ref in refs:
        torch.testing.assert_close(prep.pixel_values([ref]), want, rtol=0, atol=1e-6)


def test_colour_images_become_grey_by_luma_and_grey_ones_rgb() -> None:
    colour = np.random.default_rng(2).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    grey_model = ImagePreprocessing(size=None, crop_size=None, rescale_factor=1.0,
                                    mean=(0.0,), std=(1.0,), num_channels=1)  # fmt: skip
    luma = np.asarray(Image.fromarray(colour).convert("L"), dtype=np.float32)
    got = grey_model.pixel_values([Image.fromarray(colour)])
    assert torch.equal(got[0, 0], torch.from_numpy(luma))
    rgb_model = ImagePreprocessing(size=None, crop_size=None, rescale_factor=1.0,
                                   mean=(0.0,) * 3, std=(1.0,) * 3)  # fmt: skip
    grey = grey_pixels(3, 6, 6)
    got = rgb_model.pixel_values([ArrayImage(grey[None], 0, "hw")])
    assert got.shape == (1, 3, 6, 6)
    for channel in range(3):
        assert torch.equal(got[0, channel], torch.from_numpy(grey).float())


def test_a_grey_model_given_rgb_statistics_names_the_field(tmp_path: Path) -> None:
    config = {"size": {"shortest_edge": 8}, "crop_size": 8,
              "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(EpmqError, match=r"preprocessor_config\.json: image_mean must be 1 number"):
        ImagePreprocessing.from_folder(tmp_path, num_channels=1)
    assert ImagePreprocessing.from_folder(tmp_path).mean == (0.48, 0.46, 0.41)  # RGB: fine
    block = {"size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25]}
    with pytest.raises(EpmqError, match=r"^the 'image' block: mean must be 1 number.*grey"):
        ImagePreprocessing.from_dict(block, "the 'image' block", num_channels=1)
    with pytest.raises(EpmqError, match=r"^the 'image' block: mean is not given.*grey"):
        ImagePreprocessing.from_dict({"size": 8}, "the 'image' block", num_channels=1)
    grey = ImagePreprocessing.from_dict({"size": 8, "mean": [0.5], "std": [0.25]}, num_channels=1)
    assert (grey.mean, grey.std, grey.num_channels) == ((0.5,), (0.25,), 1)
    with pytest.raises(EpmqError, match="num_channels 4 is not supported"):
        ImagePreprocessing(mean=(0.5,) * 4, std=(0.25,) * 4, num_channels=4)


def test_vit_processor_config_resizes_the_whole_image(tmp_path: Path) -> None:
    """ViTImageProcessor's {height, width} resize (no crop), its reference output."""
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    reference = cls(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    reference.save_pretrained(tmp_path)
    prep = ImagePreprocessing.from_folder(tmp_path)
    assert prep is not None and prep.crop_size is None
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (21, 30, 3), np.uint8))
    want = reference(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(prep.pixel_values([image]), want, rtol=0, atol=1e-5)
    with pytest.raises(EpmqError, match="images are preprocessed to 16×16 but the model takes 32"):
        prep.check_model_size(32, "model")
