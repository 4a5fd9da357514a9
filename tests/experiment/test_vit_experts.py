"""``ViTForImageClassification`` experts through ``epmq run``: the encoder merged and quantized,
each task's classifier read from its checkpoint and applied to the class token, as the class's
forward does. The experts' and the merges' rows equal the user's own evaluation with
transformers' ``ViTForImageClassification`` (merged encoders computed here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_folders import CLASSES, MEAN, STD, Family, images
from image_experts import (
    N_CALIB,
    N_TEST,
    N_TRAIN,
    TASKS,
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
)

from epmq.errors import EpmqError
from epmq.eval.results import average
from epmq.experiment.config import parse_config
from epmq.experiment.folders import folder_workload


def vit_config(**extra: object) -> object:
    from transformers import ViTConfig

    return ViTConfig(**{k: v for k, v in VISION.items()}, **extra)


def build_vit(root: Path) -> tuple[Family, list[StateDict]]:
    """A pretrained ViTModel base (with its pooler, as published) and two
    ViTForImageClassification experts fine-tuned on the toy tasks for a few steps."""
    from transformers import ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    base = ViTModel(vit_config()).eval()
    family = Family("vit", root / "base", {}, "image")
    base.save_pretrained(family.base)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD)\
        .save_pretrained(family.base)  # fmt: skip
    encoder = {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}
    towers = []
    for number, task in enumerate(TASKS):
        torch.manual_seed(200 + number)
        expert = ViTForImageClassification(vit_config(num_labels=len(CLASSES)))
        expert.vit.load_state_dict(encoder)
        perturb(expert, number + 1)
        inputs = images(10 + number, N_TRAIN + N_CALIB + N_TEST)
        family.splits[task] = splits(inputs, colour_labels(inputs, number))
        train_y = family.splits[task]["train"][1]
        pixels = fine_tune(expert, family.splits[task]["train"])
        with torch.no_grad():  # then the classifier alone, on its own input: the class token
            cls = expert.vit(pixel_values=pixels).last_hidden_state[:, 0]
        expert.classifier.load_state_dict(train_linear(cls, train_y, 300 + number).state_dict())
        family.experts[task] = root / f"expert_{task}"
        expert.save_pretrained(family.experts[task])
        towers.append({k: v.detach().clone() for k, v in expert.vit.state_dict().items()})
    return family, towers


def test_vit_image_classifier_experts(tmp_path: Path) -> None:
    from transformers import ViTForImageClassification, ViTModel

    family, towers = build_vit(tmp_path)
    # GPTQ and E-PMQ walk the ViT blocks through the calibration engine; E-PMQ reads the
    # experts' tensors from their files, stored as encoder.layer.N.attention.attention.query
    # while transformers 5 names the loaded model's layers.N.attention.q_proj (read_as).
    quantization = {"methods": ["gptq", "epmq"], "bits": [8]}
    output = {"dir": str(tmp_path / "report"), "export": ["compressed-tensors"]}
    config = run_config(family, tmp_path, quantization=quantization, output=output)
    results = run(config)

    def users_accuracy(task: str, encoder: StateDict | None = None) -> float:
        model = ViTForImageClassification.from_pretrained(str(family.experts[task])).eval()
        if encoder is not None:  # the merged encoder under the task's own classifier
            model.vit.load_state_dict(encoder)
        return accuracy(lambda x: model(pixel_values=x).logits, held_out(family, task))

    want = {t: users_accuracy(t) for t in TASKS}
    assert results.find(kind="expert")[0].accuracy == want
    assert all(a > 0.5 for a in want.values()), want  # the experts learnt the toy tasks
    base = ViTModel.from_pretrained(str(family.base), add_pooling_layer=False).state_dict()
    for method, state in merged_states(base, towers).items():
        row = results.find(kind="merged", merge=method)[0]
        assert row.accuracy == {t: users_accuracy(t, state) for t in TASKS}, method
    assert results.settings["workload"]["family"] == "vit"
    quantized = results.find(kind="quantized")
    assert len(quantized) == 4  # GPTQ and E-PMQ of each merge
    for row in quantized:
        if row.quantizer == "gptq":  # 8-bit rounding barely moves a model
            reference = results.find(kind="merged", merge=row.merge)[0].accuracy
            assert all(abs(row.accuracy[t] - reference[t]) <= 3 / N_TEST for t in TASKS), row.name
        else:  # E-PMQ fits the experts' outputs: at least as good as GPTQ on average
            gptq = results.find(kind="quantized", merge=row.merge, quantizer="gptq")[0]
            assert average(row) >= average(gptq) - 2 / N_TEST, row.name

    # every quantized merge is exported; transformers reloads it (the ViT's stored names) and
    # it scores what the run reported, with the classifiers exported beside it
    workload = folder_workload(parse_config(config))
    exports = results.settings["exports"]
    assert len(exports) == 4
    for entry in exports:
        folder = tmp_path / "report" / entry["folder"]
        row = next(r for r in quantized if r.name == entry["variant"])
        reloaded = workload.evaluate(workload.load_encoder(folder), workload.heads, list(TASKS))
        assert all(abs(reloaded[t] - row.accuracy[t]) <= 1 / N_TEST for t in TASKS), row.name
        assert all((folder / "heads" / f"{t}.safetensors").is_file() for t in TASKS)

    config = run_config(family, tmp_path / "again")
    config["experts"][1]["head_input"] = "mean_patch"
    with pytest.raises(EpmqError, match=r"expert expert-second: .*reads 'cls'"):
        run(config)
