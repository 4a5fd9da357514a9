"""Every model load checks transformers' loading report: no weight is ever left random.

A folder missing a tensor, or holding one of the wrong shape, is refused naming the folder and
the tensors; a BERT folder saved without a pooler loads without one (two loads give the same
outputs); checkpoint tensors the class does not use are one warning line, unless the caller
leaves them out on purpose (BERT's pooler with ``add_pooling_layer=False``, CLIP's text tower).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    CLIPConfig,
    CLIPModel,
    T5Config,
    T5ForConditionalGeneration,
)

from epmq.errors import EpmqError
from epmq.heads import HeadOptions, family_tasks
from epmq.models.bert import load_bert
from epmq.models.registry import load_model

LOGGER = "epmq.models.folder"
CONFIG = BertConfig(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=32,
)  # fmt: skip
INPUTS = {
    "input_ids": torch.tensor([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
}


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _encoder(folder: Path, *, pooler: bool = False) -> Path:
    torch.manual_seed(0)
    return _save(BertModel(CONFIG, add_pooling_layer=pooler).eval(), folder)


def _edit(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_missing_linear_is_refused_naming_the_folder_and_tensor(tmp_path: Path) -> None:
    folder = _encoder(tmp_path / "m")
    _edit(folder, lambda t: t.pop("encoder.layer.1.attention.self.query.weight"))
    with pytest.raises(EpmqError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder) in message and "encoder.layer.1.attention.self.query.weight" in message
    assert "lacks 1 tensor" in message and "\n" not in message


def test_many_missing_tensors_are_listed_five_then_counted(tmp_path: Path) -> None:
    folder = _encoder(tmp_path / "m")
    _edit(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.layer.0.")])
    with pytest.raises(EpmqError, match=r"lacks 16 tensor\(s\).* and 11 more$"):
        load_bert(folder, add_pooling_layer=False)


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    folder = _encoder(tmp_path / "m")
    key = "encoder.layer.0.intermediate.dense.weight"
    _edit(folder, lambda t: t.update({key: t[key][:48].contiguous()}))
    with pytest.raises(EpmqError, match=rf"{key} \(48, 32\) \(config: \(64, 32\)\)"):
        load_model(folder)


def test_bert_without_pooler_loads_without_one_and_twice_the_same(tmp_path: Path) -> None:
    folder = _encoder(tmp_path / "m")
    first, _ = load_model(folder)
    torch.manual_seed(123)  # a random pooler would depend on the RNG state at load time
    second, _ = load_model(folder)
    assert first.pooler is None and second.pooler is None
    assert set(first.state_dict()) == set(load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        out_a, out_b = first(**INPUTS), second(**INPUTS)
    assert out_a.pooler_output is None and out_b.pooler_output is None
    assert torch.equal(out_a.last_hidden_state, out_b.last_hidden_state)


def test_bert_with_a_pooler_keeps_the_checkpoints_pooler(tmp_path: Path) -> None:
    folder = _encoder(tmp_path / "m", pooler=True)
    model, _ = load_model(folder)
    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(model.pooler.dense.weight, saved["pooler.dense.weight"])


def test_a_partial_pooler_is_refused_not_dropped(tmp_path: Path) -> None:
    folder = _encoder(tmp_path / "m", pooler=True)
    _edit(folder, lambda t: t.pop("pooler.dense.bias"))
    with pytest.raises(EpmqError, match=r"lacks 1 tensor\(s\).*pooler\.dense\.bias"):
        load_model(folder)


def test_a_task_model_missing_its_head_is_refused(tmp_path: Path) -> None:
    """A classification model needs its classifier: never a random one."""
    folder = _encoder(tmp_path / "m", pooler=True)
    with pytest.raises(EpmqError, match=r"classifier\.bias, classifier\.weight"):
        load_bert(folder, "sequence-classification", num_labels=3)


def test_unused_checkpoint_tensors_are_one_warning_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    folder = _save(BertForMaskedLM(CONFIG).eval(), tmp_path / "mlm")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model, _ = load_model(folder)
    assert isinstance(model, BertModel)
    (line,) = _warnings(caplog)
    assert str(folder) in line and "cls.predictions.bias" in line
    assert "tensor(s)" in line and "\n" not in line
    # a sequence classifier's head is read by the task heads: its backbone loads quietly
    caplog.clear()
    folder = _save(BertForSequenceClassification(CONFIG).eval(), tmp_path / "cls")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model, _ = load_model(folder)
    assert isinstance(model, BertModel) and model.pooler is not None
    assert _warnings(caplog) == []


def test_tensors_left_out_on_purpose_are_not_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bert = _encoder(tmp_path / "bert", pooler=True)
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(text, image_size=16, patch_size=8)
    clip = _save(
        CLIPModel(CLIPConfig(text_config={**text, "vocab_size": 50}, vision_config=vision)).eval(),
        tmp_path / "clip",
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        encoder = load_bert(bert, add_pooling_layer=False)
        tasks = family_tasks("clip", clip, HeadOptions(image={"size": 16}))
        tower = tasks.load_model(clip)
    assert encoder.pooler is None and type(tower).__name__ == "CLIPVisionModel"
    assert _warnings(caplog) == []


def test_tied_weights_are_not_missing(tmp_path: Path) -> None:
    """T5 ties ``lm_head`` to ``shared``: the checkpoint holds it once and that is enough."""
    torch.manual_seed(0)
    config = T5Config(
        d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=50,
        tie_word_embeddings=True,
    )  # fmt: skip
    folder = _save(T5ForConditionalGeneration(config).eval(), tmp_path / "t5")
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    model, _ = load_model(folder)
    assert torch.equal(model.lm_head.weight, model.shared.weight)
