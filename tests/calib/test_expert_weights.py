"""Expert weight sources: lazy safetensors folders (sharded or not), prefix resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from calib_fixtures import Setup
from safetensors.torch import save_file

from epmq.calib import EngineOptions, SafetensorsExpert, StateDictExpert, quantize_model
from epmq.errors import EpmqError
from epmq.merging import checkpoint
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid


def save_sharded(state: dict[str, torch.Tensor], folder, prefix: str = "") -> None:
    folder.mkdir(parents=True)
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for number, chunk in enumerate((names[:half], names[half:])):
        file = f"model-0000{number + 1}-of-00002.safetensors"
        save_file({prefix + n: state[n].contiguous() for n in chunk}, str(folder / file))
        weight_map.update({prefix + n: file for n in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_prefix_is_resolved_both_ways() -> None:
    w = torch.randn(3, 3)
    prefixed = StateDictExpert({"bert.encoder.layer.0.x.weight": w}, "a")
    assert prefixed.resolve("encoder.layer.0.x.weight") == "bert.encoder.layer.0.x.weight"
    bare = StateDictExpert({"encoder.layer.0.x.weight": w}, "b")
    assert bare.resolve("bert.encoder.layer.0.x.weight") == "encoder.layer.0.x.weight"
    with pytest.raises(EpmqError, match=r"expert 'b' has no tensor 'encoder\.layer\.1"):
        bare.tensor("encoder.layer.1.x.weight")


def test_nan_in_expert_is_named() -> None:
    expert = StateDictExpert({"l.weight": torch.tensor([[float("inf")]])}, "hot")
    with pytest.raises(EpmqError, match=r"'hot'.*'l\.weight'.*NaN or Inf"):
        expert.tensor("l.weight")


def test_sharded_folder_reads_lazily(setup: Setup, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "expert"
    save_sharded(setup.experts[0], folder, prefix="bert.")
    expert = SafetensorsExpert(folder)
    assert expert.name == "expert"
    opened: list[str] = []
    real_open = checkpoint.safe_open

    def spy(path: str, **kwargs: object) -> object:
        opened.append(Path(path).name)
        return real_open(path, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", spy)
    name = "encoder.layer.1.output.dense.weight"
    assert torch.equal(expert.tensor(name), setup.experts[0][name])
    # only the shard holding that tensor was opened (and closed again after the copy)
    assert opened == [expert._reader.file_of[f"bert.{name}"]]


def test_run_from_folders_equals_run_from_state_dicts(setup: Setup, tmp_path) -> None:
    folders = []
    for i, state in enumerate(setup.experts):
        folder = tmp_path / f"e{i}"
        if i == 0:
            save_sharded(state, folder, prefix="bert.")
        else:
            folder.mkdir()
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors")
            )
        folders.append(folder)
    kwargs = dict(method="epmq", grid=QuantGrid(4), alpha=0.1, engine=EngineOptions(progress=False))
    a, b = setup.merged(), setup.merged()
    quantize_model(a, BertAdapter(), setup.calib, experts=setup.experts, **kwargs)
    quantize_model(b, BertAdapter(), setup.calib, experts=folders, **kwargs)
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


def test_folder_without_weights(tmp_path) -> None:
    with pytest.raises(EpmqError, match=r"expert 'empty': .*no model\.safetensors"):
        SafetensorsExpert(tmp_path, name="empty")


def test_bin_weights_with_a_head_file_beside_them(setup: Setup, tmp_path) -> None:
    """The head.safetensors beside pytorch_model.bin is not the model: the .bin is read."""
    state = {k: v.contiguous() for k, v in setup.experts[0].items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    save_file({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, tmp_path / "head.safetensors")
    expert = SafetensorsExpert(tmp_path, name="binary")
    assert set(expert.keys()) == set(state)
    name = "encoder.layer.1.output.dense.weight"
    assert torch.equal(expert.tensor(name), state[name])


def test_read_as_follows_transformers_renaming(tmp_path: Path) -> None:
    """transformers 5 loads a ViT's stored ``encoder.layer.N.attention.attention.query`` as
    ``layers.N.attention.q_proj``: read_as makes the expert answer the model's names."""
    from transformers import ViTConfig, ViTModel

    from epmq.calib import SafetensorsExpert

    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=16, patch_size=8,
    )  # fmt: skip
    model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(tmp_path / "vit")
    expert = SafetensorsExpert(tmp_path / "vit", name="vit")
    name = "layers.0.attention.q_proj.weight"
    assert name in dict(model.named_parameters())
    with pytest.raises(EpmqError, match="has no tensor"):
        expert.tensor(name)
    expert.read_as(model)
    torch.testing.assert_close(expert.tensor(name), model.get_parameter(name).detach())
