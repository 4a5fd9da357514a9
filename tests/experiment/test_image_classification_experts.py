"""CLIP image experts as fine-tuning leaves them, through ``epmq run``: linear heads trained on
the raw pooled output (``head_input: pooled``) and ``CLIPForImageClassification`` experts
(classifier inside the checkpoint, reading the mean of the patch tokens).

Each test fine-tunes tiny models for a few steps on a toy colour task, then compares what epmq
reports with the user's own evaluation: a plain torch loop over transformers' classes (never
epmq's code), for the experts and for every merged model (whose weights the test merges
itself: task arithmetic and the plain average of the vision towers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from family_folders import CLASSES, MEAN, STD, Family, images, pixel_values, save_head, write_data
from torch import nn

from epmq.errors import EpmqError
from epmq.experiment.config import parse_config
from epmq.experiment.session import run_session

TASKS = ("first", "second")
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8,
)  # fmt: skip
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    vocab_size=40, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
)  # fmt: skip
N_TRAIN, N_CALIB, N_TEST = 32, 8, 32
MERGES = {"task_arithmetic": 0.5, "average": None}  # merge method -> task arithmetic's scale

StateDict = Mapping[str, torch.Tensor]


def preprocessor(mean: list[float], std: list[float]) -> dict[str, Any]:
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }


def write_base(folder: Path, model: nn.Module, mean: list[float], std: list[float]) -> None:
    import json

    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor(mean, std)))


def colour_labels(inputs: np.ndarray, task: int) -> np.ndarray:
    """The toy tasks: the strongest colour channel (task 0), the weakest (task 1)."""
    means = inputs.reshape(len(inputs), -1, 3).mean(1)
    return means.argmax(1) if task == 0 else means.argmin(1)


def splits(inputs: np.ndarray, labels: np.ndarray) -> dict[str, tuple[list[Any], list[int]]]:
    a, b = N_TRAIN, N_TRAIN + N_CALIB
    cut = {"train": slice(0, a), "calib": slice(a, b), "test": slice(b, None)}
    return {k: (list(inputs[s]), [int(v) for v in labels[s]]) for k, s in cut.items()}


def perturb(model: nn.Module, seed: int) -> None:
    """The expert's own fine-tuning, in short: its encoder blocks moved off the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))


def train_linear(features: torch.Tensor, labels: list[int], seed: int) -> nn.Linear:
    """A linear head fitted for a few steps (full batch, Adam) on ``features``."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], len(CLASSES))
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05)
    target = torch.tensor(labels)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(head(features), target).backward()
        optimiser.step()
    return head.eval()


def merged_states(base: StateDict, experts: list[StateDict]) -> dict[str, StateDict]:
    """The merges of the config, computed here: W0 + s Σ (Wi - W0), and the mean of the Wi."""
    out: dict[str, StateDict] = {}
    for method, scale in MERGES.items():
        merged = {}
        for name, w0 in base.items():
            stack = torch.stack([e[name].float() for e in experts])
            if scale is None:
                merged[name] = stack.mean(0)
            else:
                merged[name] = w0 + scale * (stack - w0).sum(0)
        out[method] = merged
    return out


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], split: tuple[list, list]) -> float:
    inputs, labels = split
    with torch.no_grad():
        predicted = predict(pixel_values(np.stack(inputs)))
    return int((predicted.argmax(-1) == torch.tensor(labels)).sum()) / len(labels)


def run_config(family: Family, root: Path, **overrides: Any) -> dict[str, Any]:
    tasks = []
    for task in TASKS:
        data = write_data(family, task, "npz", root / "data" / task)
        tasks.append({"name": task, "data": str(data), "format": "npz",
                      "classes": list(CLASSES), "calib_size": N_CALIB})  # fmt: skip
    config = {
        "name": "images",
        "base": {"path": str(family.base)},
        "experts": [
            {"name": f"expert-{t}", "path": str(family.experts[t]), "task": t} for t in TASKS
        ],
        "tasks": tasks,
        "merges": [
            {"method": m, "params": {} if s is None else {"scale": s}} for m, s in MERGES.items()
        ],
        "quantization": {"methods": ["rtn"], "bits": [8]},
        "calibration": {"batch_size": 8},
        "output": {"dir": str(root / "report")},
    }
    config.update(overrides)
    return config


def _test(family: Family, task: str) -> tuple[list, list]:
    return family.splits[task]["test"]


def run(config: dict[str, Any]) -> Any:
    results, _ = run_session(parse_config(config), progress=False, announce=lambda _: None)
    return results


def clip_base(root: Path) -> Family:
    """A pretrained CLIPModel base (text tower and projections) in ``root/base``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    family = Family("clip", root / "base", {}, "image")
    base = CLIPModel(config).eval()
    with torch.no_grad():  # a trained final layernorm: pooled features of varying norm
        base.vision_model.post_layernorm.weight.uniform_(0.2, 2.0)
        base.vision_model.post_layernorm.bias.normal_(0.0, 1.0)
    write_base(family.base, base, MEAN, STD)
    return family


# -- a linear head on the raw pooled output -----------------------------------------------------
def build_pooled_heads(root: Path) -> tuple[Family, dict[str, nn.Linear], list[StateDict]]:
    """A CLIPModel base, two fine-tuned CLIPVisionModel experts, and heads trained on each
    expert's raw ``pooler_output`` (what a plain nn.Linear on CLIPVisionModel is trained on)."""
    from transformers import CLIPVisionModel

    family = clip_base(root)
    heads, towers = {}, []
    for number, task in enumerate(TASKS):
        expert = CLIPVisionModel.from_pretrained(str(family.base)).eval()
        perturb(expert, number + 1)
        inputs = images(10 + number, N_TRAIN + N_CALIB + N_TEST)
        family.splits[task] = splits(inputs, colour_labels(inputs, number))
        train_x, train_y = family.splits[task]["train"]
        with torch.no_grad():
            features = expert(pixel_values=pixel_values(np.stack(train_x))).pooler_output
        heads[task] = train_linear(features, train_y, 100 + number)
        family.experts[task] = root / f"expert_{task}"
        expert.save_pretrained(family.experts[task])
        save_head(family.experts[task], heads[task])
        towers.append(expert.state_dict())
    return family, heads, towers


PooledHeads = tuple[Family, dict[str, nn.Linear], list[StateDict]]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> PooledHeads:
    return build_pooled_heads(tmp_path_factory.mktemp("pooled"))


def test_pooled_head_matches_the_users_own_evaluation(pooled: PooledHeads, tmp_path: Path) -> None:
    from transformers import CLIPVisionModel

    family, heads, towers = pooled
    config = run_config(family, tmp_path)
    for expert in config["experts"]:
        expert["head_input"] = "pooled"
    results = run(config)

    tower = CLIPVisionModel.from_pretrained(str(family.base)).eval()
    base_state = {k: v.clone() for k, v in tower.state_dict().items()}

    def users_accuracy(state: StateDict, task: str) -> float:
        tower.load_state_dict(state)
        head = heads[task]
        return accuracy(lambda x: head(tower(pixel_values=x).pooler_output), _test(family, task))

    expert_row = results.find(kind="expert")[0].accuracy
    want = {t: users_accuracy(towers[i], t) for i, t in enumerate(TASKS)}
    assert expert_row == want
    assert all(a > 0.5 for a in want.values()), want  # the heads learnt the toy task
    for method, state in merged_states(base_state, towers).items():
        row = results.find(kind="merged", merge=method)[0]
        assert row.accuracy == {t: users_accuracy(state, t) for t in TASKS}, method


def test_head_input_values_are_checked(pooled: PooledHeads, tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    family = pooled[0]
    config = run_config(family, tmp_path)
    config["experts"][0]["head_input"] = "pooled"
    config["experts"][1]["head_input"] = "cls"
    with pytest.raises(EpmqError, match=r"expert expert-second: head_input 'cls' .*pooled"):
        run(config)
    # a CLIPVisionModel base has no visual_projection: nothing is 'projected'
    bare = tmp_path / "bare"
    torch.manual_seed(0)
    write_base(bare, CLIPVisionModel(CLIPVisionConfig(**VISION)).eval(), MEAN, STD)
    config["base"]["path"] = str(bare)
    config["experts"][1]["head_input"] = "projected"
    with pytest.raises(EpmqError, match=r"expert expert-second: .*'projected'.*has none"):
        run(config)


# -- CLIPForImageClassification experts: the classifier inside the checkpoint -----------------
def build_classifiers(root: Path) -> tuple[Family, list[StateDict]]:
    """Two CLIPForImageClassification experts fine-tuned from the base's vision tower on the
    toy tasks (every weight a few Adam steps, then the classifier alone), saved as
    transformers saves them."""
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPVisionModel

    family = clip_base(root)
    tower = CLIPVisionModel.from_pretrained(str(family.base))
    towers = []
    for number, task in enumerate(TASKS):
        config = CLIPConfig(text_config=TEXT, vision_config=VISION, num_labels=len(CLASSES))
        torch.manual_seed(200 + number)
        expert = CLIPForImageClassification(config)
        expert.vision_model.load_state_dict(tower.state_dict())
        perturb(expert, number + 1)
        inputs = images(10 + number, N_TRAIN + N_CALIB + N_TEST)
        family.splits[task] = splits(inputs, colour_labels(inputs, number))
        train_x, train_y = family.splits[task]["train"]
        pixels, target = pixel_values(np.stack(train_x)), torch.tensor(train_y)
        optimiser = torch.optim.Adam(expert.parameters(), lr=3e-3)
        expert.train()
        for _ in range(8):
            optimiser.zero_grad()
            expert(pixel_values=pixels, labels=target).loss.backward()
            optimiser.step()
        expert.eval()
        with torch.no_grad():  # then the classifier alone, on its own input: the patch mean
            patches = expert.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        probe = train_linear(patches.mean(1), train_y, 300 + number)
        expert.classifier.load_state_dict(probe.state_dict())
        family.experts[task] = root / f"expert_{task}"
        expert.save_pretrained(family.experts[task])
        towers.append({k: v.detach().clone() for k, v in expert.vision_model.state_dict().items()})
    return family, towers


def test_clip_image_classifier_experts_read_as_they_are(tmp_path: Path) -> None:
    from transformers import CLIPForImageClassification, CLIPVisionModel

    family, towers = build_classifiers(tmp_path)
    results = run(run_config(family, tmp_path))

    def users_accuracy(task: str, tower: StateDict | None = None) -> float:
        model = CLIPForImageClassification.from_pretrained(str(family.experts[task])).eval()
        if tower is not None:  # the merged vision tower under the task's own classifier
            model.vision_model.load_state_dict(tower)
        return accuracy(lambda x: model(pixel_values=x).logits, _test(family, task))

    want = {t: users_accuracy(t) for t in TASKS}
    assert results.find(kind="expert")[0].accuracy == want
    assert all(a > 0.5 for a in want.values()), want  # the experts learnt the toy task
    base_state = CLIPVisionModel.from_pretrained(str(family.base)).state_dict()
    for method, state in merged_states(base_state, towers).items():
        row = results.find(kind="merged", merge=method)[0]
        assert row.accuracy == {t: users_accuracy(t, state) for t in TASKS}, method

    config = run_config(family, tmp_path / "again")
    config["experts"][0]["head_input"] = "pooled"
    with pytest.raises(EpmqError, match=r"expert expert-first: .*reads 'mean_patch'"):
        run(config)
