"""Text experts as fine-tuning leaves them: ``*ForSequenceClassification`` checkpoints with the
head inside, read by ``epmq run`` as they are (BERT, RoBERTa, ELECTRA, DistilBERT); the pooler
as head or merged (``merge_pooler``); what a head file reads (``head_input``)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from text_classifiers import KEYS, TextProject, build_kind, config_for, own_logits

from epmq.errors import EpmqError
from epmq.eval.results import load_results
from epmq.experiment.config import parse_config
from epmq.experiment.folders import folder_workload
from epmq.experiment.session import run_session
from epmq.heads.sequence_classification import CheckpointHead, FileHead

KINDS = ("bert", "roberta", "electra", "distilbert")


class Projects(dict[str, TextProject]):
    """Each kind's project, built (fine-tuned) the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, kind: str) -> TextProject:
        self[kind] = build_kind(self.root / kind, kind)
        return self[kind]


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Projects:
    return Projects(tmp_path_factory.mktemp("text"))


def own_accuracy(project: TextProject, task: str) -> float:
    """The expert's own evaluation: its logits' argmax against the labels (as epmq counts)."""
    texts, labels = project.splits[task]["test"]
    predicted = own_logits(project.experts[task], texts).argmax(-1)
    return int((predicted == torch.tensor(labels)).sum()) / len(labels)


def epmq_logits(workload: Any, project: TextProject, task: str, folder: Path) -> torch.Tensor:
    """The logits of the task's head on the encoder in ``folder``, as epmq computes them."""
    from epmq.heads import family_tasks
    from epmq.heads.base import HeadOptions

    logic = family_tasks(workload.settings["family"], project.base, HeadOptions())
    texts = project.splits[task]["test"][0]
    batch = dict(logic.tokenizer(list(texts), padding=True, return_tensors="pt"))
    encoder = workload.load_encoder(folder)
    with torch.no_grad():
        return workload.heads[task].logits(logic.outputs(encoder, batch), batch["attention_mask"])


def run(config: dict[str, Any]) -> Any:
    results, _ = run_session(parse_config(config), progress=False, announce=lambda _: None)
    return results


@pytest.mark.parametrize("kind", KINDS)
def test_epmq_logits_equal_the_task_models_own(
    projects: dict[str, TextProject], kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    project = projects[kind]
    with caplog.at_level(logging.WARNING, logger="epmq"):
        workload = folder_workload(parse_config(config_for(project, tmp_path / "out")))
        for task in KEYS:
            assert isinstance(workload.heads[task], CheckpointHead)
            want = own_logits(project.experts[task], project.splits[task]["test"][0])
            got = epmq_logits(workload, project, task, project.experts[task])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert caplog.records == []  # the checkpoint's classifier is read, not "left out"


BACKBONES = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra", "distilbert": "DistilBert"}


@pytest.mark.parametrize("kind", KINDS)
def test_run_reports_the_experts_own_accuracy(
    projects: dict[str, TextProject], kind: str, tmp_path: Path
) -> None:
    """``epmq run`` (GPTQ: calibration batches go through the backbone) reports each expert's
    own accuracy (DistilBERT on the command line); every kind's quantized merge is exported,
    with the checkpoint's head modules beside it, and reloads to the same accuracy."""
    project = projects[kind]
    out = tmp_path / "out"
    config = config_for(project, tmp_path, quantization={"methods": ["gptq"], "bits": [8]})
    if kind == "distilbert":
        config["output"] = {"dir": str(out), "export": ["dequantized", "compressed-tensors"]}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(config))))
        done = subprocess.run(
            [sys.executable, "-m", "epmq", "run", str(path)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        assert "left out" not in done.stderr  # the classifier is read, not dropped
        results = load_results(out / "results.json")
    else:
        config["output"] = {"dir": str(out), "export": ["compressed-tensors"]}
        results = run(config)
    expert = results.find(kind="expert")[0].accuracy
    assert expert == {t: own_accuracy(project, t) for t in KEYS}
    assert min(expert.values()) > 0.7  # the fine-tuning learnt the toy task
    assert results.find(kind="quantized")[0].accuracy.keys() == set(KEYS)
    exports = results.settings["exports"]  # every kind's quantized merge is exported, reloads
    formats = (
        ["dequantized", "compressed-tensors"] if kind == "distilbert" else ["compressed-tensors"]
    )
    assert [e["format"] for e in exports] == formats
    workload = folder_workload(parse_config(config))
    row = results.find(kind="quantized")[0]
    for entry in exports:
        for task in KEYS:  # the checkpoint's head modules stored beside the weights
            stored = out / entry["folder"] / "heads" / f"{task}.safetensors"
            head = workload.heads[task].state_dict()
            assert sorted(load_file(str(stored))) == sorted(head)
            assert any(k.startswith("classifier.") for k in head)
            for key, value in load_file(str(stored)).items():
                torch.testing.assert_close(value, head[key].float())
        encoder = workload.load_encoder(out / entry["folder"])
        assert type(encoder).__name__ == f"{BACKBONES[kind]}Model"
        reloaded = workload.evaluate(encoder, workload.heads, list(KEYS))
        for task in KEYS:  # float16 storage may flip a near tie
            assert abs(reloaded[task] - row.accuracy[task]) <= 1 / 24


def test_merge_pooler_merges_the_poolers(projects: dict[str, TextProject], tmp_path: Path) -> None:
    """With ``merge_pooler`` the backbone carries the pooler (merged with the others) and the
    BERT heads hold none: they read the backbone's pooler output, the expert's own here."""
    project = projects["bert"]
    config = config_for(project, tmp_path / "a", merge_pooler=True)
    workload = folder_workload(parse_config(config))
    for task in KEYS:
        head = workload.heads[task]
        assert isinstance(head, CheckpointHead) and head.pooler is None
        assert workload.load_encoder(project.experts[task]).pooler is not None
        want = own_logits(project.experts[task], project.splits[task]["test"][0])
        got = epmq_logits(workload, project, task, project.experts[task])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    default = folder_workload(parse_config(config_for(project, tmp_path / "out")))
    assert default.heads["first"].pooler is not None
    assert default.load_encoder(project.experts["first"]).pooler is None
    results = run(config)
    assert results.find(kind="expert")[0].accuracy == {t: own_accuracy(project, t) for t in KEYS}
    # the merged row is the task-arithmetic merge of every tensor, poolers included, read by
    # heads that keep no pooler of their own
    merged = workload.load_encoder(project.base)
    base = merged.state_dict()
    experts = [workload.load_encoder(project.experts[t]).state_dict() for t in KEYS]
    state = {k: v + 0.5 * sum(e[k] - v for e in experts) for k, v in base.items()}
    assert not torch.equal(state["pooler.dense.weight"], base["pooler.dense.weight"])
    merged.load_state_dict(state)
    by_hand = workload.evaluate(merged, workload.heads, list(KEYS))
    assert results.find(kind="merged")[0].accuracy == by_hand


def head_file_expert(project: TextProject, task: str, folder: Path, *, pooler: bool) -> Path:
    """The task's expert re-saved as a bare encoder (with or without its pooler) and its
    classifier as ``head.safetensors``: a head file trained on the pooler output."""
    from transformers import AutoModelForSequenceClassification

    task_model = AutoModelForSequenceClassification.from_pretrained(str(project.experts[task]))
    encoder = task_model.base_model
    if not pooler:
        encoder.pooler = None
        encoder.config.add_pooling_layer = False
    encoder.save_pretrained(folder)
    shutil.copy(project.base / "tokenizer.json", folder / "tokenizer.json")
    linear = task_model.classifier
    save_file(
        {"weight": linear.weight.detach().contiguous(), "bias": linear.bias.detach().contiguous()},
        str(folder / "head.safetensors"),
    )
    return folder


def test_head_input_pooler_reads_the_experts_pooler_else_the_bases(
    projects: dict[str, TextProject], tmp_path: Path
) -> None:
    project = projects["bert"]
    own = head_file_expert(project, "first", tmp_path / "own", pooler=True)
    bare = head_file_expert(project, "second", tmp_path / "bare", pooler=False)
    config = config_for(project, tmp_path / "out")
    config["experts"] = [
        {"name": "own", "path": str(own), "task": "first", "head_input": "pooler"},
        {"name": "bare", "path": str(bare), "task": "second", "head_input": "pooler"},
    ]
    workload = folder_workload(parse_config(config))
    first, second = workload.heads["first"], workload.heads["second"]
    assert isinstance(first, FileHead) and first.reads == "pooler"
    # the expert's own pooler: the same logits as its task model
    want = own_logits(project.experts["first"], project.splits["first"]["test"][0])
    torch.testing.assert_close(
        epmq_logits(workload, project, "first", own), want, atol=1e-5, rtol=0
    )
    # no pooler in the expert's checkpoint: the base's pooler
    from transformers import AutoModel

    base_pooler = AutoModel.from_pretrained(str(project.base)).pooler
    torch.testing.assert_close(second.pooler.dense.weight, base_pooler.dense.weight)
    results = run(config)
    assert results.find(kind="expert")[0].accuracy["first"] == own_accuracy(project, "first")


def test_head_input_mistakes_are_one_line(projects: dict[str, TextProject], tmp_path: Path) -> None:
    bert = projects["bert"]
    own = head_file_expert(bert, "first", tmp_path / "own", pooler=True)
    config = config_for(bert, tmp_path / "out")
    config["experts"][0] = {"name": "own", "path": str(own), "task": "first", "head_input": "max"}
    with pytest.raises(
        EpmqError, match=r"expert own: head_input 'max' is not one of mean, cls, pooler"
    ):
        folder_workload(parse_config(config))
    # a checkpoint head reads what its architecture reads: head_input is refused
    config = config_for(bert, tmp_path / "out")
    config["experts"][0]["head_input"] = "cls"
    with pytest.raises(EpmqError, match=r"expert expert-first: head_input 'cls' applies to a head"):
        folder_workload(parse_config(config))
    # neither the expert nor the base holds a pooler (DistilBERT has none)
    distil = projects["distilbert"]
    folder = tmp_path / "distil"
    shutil.copytree(distil.experts["first"], folder)
    width = 32
    save_file(
        {"weight": torch.zeros(2, width), "bias": torch.zeros(2)}, str(folder / "head.safetensors")
    )
    config = config_for(distil, tmp_path / "out")
    config["experts"][0] = {
        "name": "d",
        "path": str(folder),
        "task": "first",
        "head_input": "pooler",
    }
    with pytest.raises(
        EpmqError, match=r"expert d: head_input 'pooler' reads a BERT pooler, but neither"
    ):
        folder_workload(parse_config(config))
    assert not (tmp_path / "out").exists()
    # merge_pooler with experts whose checkpoints hold no pooler (RoBERTa's task models)
    roberta = projects["roberta"]
    config = config_for(roberta, tmp_path / "out", merge_pooler=True)
    with pytest.raises(EpmqError, match=r"merge_pooler: .*base holds a pooler but .* does not"):
        folder_workload(parse_config(config))
    assert not (tmp_path / "out").exists()
    # an expert of another architecture than the base's
    config = config_for(bert, tmp_path / "out")
    config["experts"][1]["path"] = str(projects["distilbert"].experts["second"])
    with pytest.raises(EpmqError, match=r"expert expert-second: .* holds a 'distilbert' model but"):
        folder_workload(parse_config(config))
    assert not (tmp_path / "out").exists()
