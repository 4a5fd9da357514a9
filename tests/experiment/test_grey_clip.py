"""A grey (``num_channels: 1``) CLIP vision suite through ``epmq run``: grey images from npz
arrays and image folders, linear heads on the pooled output, and the user's own evaluation
(plain torch on ``[N, 1, H, W]`` pixels) equal to the experts' and the merges' rows. A grey
model given RGB statistics is refused with one line naming the file, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from family_folders import Family, save_head
from image_experts import (
    N_CALIB,
    N_TEST,
    N_TRAIN,
    TASKS,
    VISION,
    StateDict,
    accuracy,
    held_out,
    merged_states,
    perturb,
    run,
    run_config,
    splits,
    train_linear,
    write_base,
)
from torch import nn

from epmq.errors import EpmqError

GREY_MEAN, GREY_STD = [0.5], [0.25]
GreySuite = tuple[Family, dict[str, nn.Linear], list[StateDict]]


def grey_images(seed: int, n: int) -> np.ndarray:
    """``n`` grey 32×32 images: three vertical bands of random levels, plus noise."""
    rng = np.random.default_rng(seed)
    levels = np.repeat(rng.uniform(0, 255, (n, 1, 3)), [11, 11, 10], axis=2)
    noise = rng.normal(0, 30, (n, 32, 32))
    return np.clip(levels + noise, 0, 255).astype(np.uint8)


def grey_labels(inputs: np.ndarray, task: int) -> np.ndarray:
    """Task 0: brightness tercile; task 1: the brightest band."""
    if task == 0:
        return np.digitize(inputs.mean((1, 2)), [255 / 3, 2 * 255 / 3])
    bands = [inputs[:, :, :11], inputs[:, :, 11:22], inputs[:, :, 22:]]
    return np.stack([band.mean((1, 2)) for band in bands], axis=1).argmax(1)


def grey_pixels(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(batch).float().unsqueeze(1) / 255.0
    return (x - GREY_MEAN[0]) / GREY_STD[0]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> GreySuite:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("grey")
    torch.manual_seed(0)
    base = CLIPVisionModel(CLIPVisionConfig(**VISION, num_channels=1)).eval()
    with torch.no_grad():
        base.post_layernorm.weight.uniform_(0.2, 2.0)
        base.post_layernorm.bias.normal_(0.0, 1.0)
    family = Family("clip", root / "base", {}, "image")
    write_base(family.base, base, GREY_MEAN, GREY_STD)
    heads, towers = {}, []
    for number, task in enumerate(TASKS):
        expert = CLIPVisionModel.from_pretrained(str(family.base)).eval()
        perturb(expert, number + 1)
        inputs = grey_images(20 + number, N_TRAIN + N_CALIB + N_TEST)
        family.splits[task] = splits(inputs, grey_labels(inputs, number))
        train_x, train_y = family.splits[task]["train"]
        with torch.no_grad():
            features = expert(pixel_values=grey_pixels(np.stack(train_x))).pooler_output
        heads[task] = train_linear(features, train_y, 400 + number)
        family.experts[task] = root / f"expert_{task}"
        expert.save_pretrained(family.experts[task])
        save_head(family.experts[task], heads[task])
        towers.append({k: v.clone() for k, v in expert.state_dict().items()})
    return family, heads, towers


def test_grey_suite_runs_end_to_end(suite: GreySuite, tmp_path: Path) -> None:
    from transformers import CLIPVisionModel

    family, heads, towers = suite
    config = run_config(family, tmp_path, formats=("npz", "imagefolder"))
    for expert in config["experts"]:
        expert["head_input"] = "pooled"
    results = run(config)

    tower = CLIPVisionModel.from_pretrained(str(family.base)).eval()
    base_state = {k: v.clone() for k, v in tower.state_dict().items()}

    def users_accuracy(state: StateDict, task: str) -> float:
        tower.load_state_dict(state)
        examples = held_out(family, task)
        return accuracy(
            lambda x: heads[task](tower(pixel_values=x).pooler_output), examples, grey_pixels
        )

    want = {t: users_accuracy(towers[i], t) for i, t in enumerate(TASKS)}
    assert results.find(kind="expert")[0].accuracy == want
    assert all(a > 0.5 for a in want.values()), want  # the heads learnt the toy tasks
    for method, state in merged_states(base_state, towers).items():
        row = results.find(kind="merged", merge=method)[0]
        assert row.accuracy == {t: users_accuracy(state, t) for t in TASKS}, method
    assert len(results.find(kind="quantized")) == 2  # RTN 8-bit of each merge


def test_grey_model_given_rgb_statistics(suite: GreySuite, tmp_path: Path) -> None:
    family = suite[0]
    config = run_config(family, tmp_path)
    # the config's image block, for a base folder without preprocessor_config.json
    bare = tmp_path / "bare_base"
    bare.mkdir()
    for file in family.base.iterdir():
        if file.name != "preprocessor_config.json":
            (bare / file.name).write_bytes(file.read_bytes())
    config["base"]["path"] = str(bare)
    config["image"] = {"size": 32, "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}
    with pytest.raises(EpmqError, match=r"the config's 'image' block: mean must be 1 number"):
        run(config)
    # preprocessor_config.json with RGB statistics, through the command line
    processor = bare / "preprocessor_config.json"
    stats = json.loads((family.base / "preprocessor_config.json").read_text())
    processor.write_text(json.dumps({**stats, "image_mean": [0.48, 0.46, 0.41]}))
    del config["image"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "epmq", "run", str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("epmq: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{processor}: image_mean must be 1 number" in errors[0]
    assert not (tmp_path / "report").exists()
