"""CLIP image experts as fine-tuning leaves them, through ``epmq run``: linear heads trained on
the raw pooled output (``head_input: pooled``) and ``CLIPForImageClassification`` experts
(classifier inside the checkpoint, reading the mean of the patch tokens).

Each test fine-tunes tiny models for a few steps on a toy colour task, then compares what epmq
reports with the user's own evaluation: a plain torch loop over transformers' classes (never
epmq's code), for the experts and for every merged model (whose weights the test merges
itself: task arithmetic and the plain average of the vision towers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from family_folders import CLASSES, MEAN, STD, Family, images, pixel_values, save_head
from image_experts import (
    N_CALIB,
    N_TEST,
    N_TRAIN,
    TASKS,
    TEXT,
    VISION,
    StateDict,
    accuracy,
    colour_labels,
    fine_tune,
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
        return accuracy(lambda x: head(tower(pixel_values=x).pooler_output), held_out(family, task))

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
        train_y = family.splits[task]["train"][1]
        pixels = fine_tune(expert, family.splits[task]["train"])
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
        return accuracy(lambda x: model(pixel_values=x).logits, held_out(family, task))

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
