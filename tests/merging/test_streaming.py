"""Streaming merge of tiny BERT folders equals the in-memory merge and loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel

from epmq.errors import EpmqError
from epmq.merging import merge, merge_checkpoints
from epmq.merging.checkpoint import CheckpointReader


def _loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.meta}


def _grams(base_state: dict[str, torch.Tensor], k: int) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    grams = {}
    for name in (
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.output.dense.weight",
    ):
        d_in = base_state[name].shape[1]
        xs = [torch.randn(3 * d_in, d_in, generator=gen) for _ in range(k)]
        grams[name] = [x.T @ x / x.shape[0] for x in xs]
    return grams


CASES = [
    ("average", {}),
    ("task_arithmetic", {"scale": 0.3}),
    ("ties", {"density": 0.2, "merge_func": "sum", "scale": 0.3}),
    ("ties", {"density": 0.3, "topk_scope": "tensor"}),
    ("dare", {"drop_rate": 0.4, "seed": 1, "combine": "ties"}),
    ("regmean", {}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_streaming_equals_in_memory_and_loads(
    tiny_models: dict, tmp_path: Path, method: str, params: dict
) -> None:
    base_state, experts = tiny_models["base_state"], tiny_models["experts"]
    grams = _grams(base_state, len(experts)) if method == "regmean" else None
    out = merge_checkpoints(
        tiny_models["root"] / "base",
        tiny_models["expert_dirs"],
        tmp_path / "merged",
        method,
        exclude="pooler.*",
        grams=grams,
        **params,
    )
    # in memory, from the same files (save_pretrained may drop tied / non-persistent entries)
    mem = merge(
        _loaded_state(tiny_models["root"] / "base"),
        [_loaded_state(d) for d in tiny_models["expert_dirs"]],
        method,
        exclude="pooler.*",
        grams=grams,
        **params,
    )
    written = load_file(out / "model.safetensors")
    assert written.keys() == mem.keys()
    for name, tensor in mem.items():
        assert torch.equal(written[name], tensor), name
    assert torch.equal(written["pooler.dense.weight"], base_state["pooler.dense.weight"])
    assert not torch.equal(
        written["embeddings.word_embeddings.weight"],
        base_state["embeddings.word_embeddings.weight"],
    )
    model = BertModel.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        if name in written:
            assert torch.equal(tensor, written[name]), name
    record = json.loads((out / "merge_record.json").read_text())
    assert record["method"] == method
    assert record["params"].items() >= params.items()
    assert record["experts"] == [str(d) for d in tiny_models["expert_dirs"]]
    assert record["exclude"] == ["pooler.*"]
    assert "pooler.dense.weight" in record["kept_from_base"]
    assert record["epmq_version"]
    assert (out / "config.json").is_file() and (out / "vocab.txt").is_file()


def test_global_thresholds_recorded(tiny_models: dict, tmp_path: Path) -> None:
    out = merge_checkpoints(
        tiny_models["root"] / "base", tiny_models["expert_dirs"], tmp_path / "m", "ties"
    )
    record = json.loads((out / "merge_record.json").read_text())
    assert len(record["global_thresholds"]) == 3
    assert all(t > 0 for t in record["global_thresholds"])


def test_sharded_base_gives_sharded_output(tiny_models: dict, tmp_path: Path) -> None:
    base_dir = tiny_models["root"] / "base_sharded"
    out = merge_checkpoints(base_dir, tiny_models["expert_dirs"], tmp_path / "m", "task_arithmetic")
    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict(sorted(base_index["weight_map"].items()))
    assert len(set(index["weight_map"].values())) > 1
    single = merge_checkpoints(
        tiny_models["root"] / "base", tiny_models["expert_dirs"], tmp_path / "s", "task_arithmetic"
    )
    one = load_file(single / "model.safetensors")
    loaded = BertModel.from_pretrained(out).state_dict()
    for name, tensor in one.items():
        assert torch.equal(loaded[name], tensor), name


def test_bin_only_base_is_loaded_whole(tiny_models: dict, tmp_path: Path) -> None:
    base_dir = tmp_path / "bin_base"
    base_dir.mkdir()
    src = tiny_models["root"] / "base"
    (base_dir / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), base_dir / "pytorch_model.bin")
    out = merge_checkpoints(base_dir, tiny_models["expert_dirs"], tmp_path / "m", "average")
    ref = merge_checkpoints(src, tiny_models["expert_dirs"], tmp_path / "r", "average")
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "pytorch_model.bin").exists()


def test_bin_expert_with_a_head_file_beside_it(tiny_models: dict, tmp_path: Path) -> None:
    """head.safetensors beside pytorch_model.bin is a task head, not the expert's weights."""
    expert = tmp_path / "bin_expert"
    expert.mkdir()
    src = tiny_models["expert_dirs"][0]
    (expert / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), expert / "pytorch_model.bin")
    save_file({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, expert / "head.safetensors")
    base, others = tiny_models["root"] / "base", tiny_models["expert_dirs"][1:]
    out = merge_checkpoints(base, [expert, *others], tmp_path / "m", "average")
    ref = merge_checkpoints(base, [src, *others], tmp_path / "r", "average")
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_without_force(tiny_models: dict, tmp_path: Path) -> None:
    args = (tiny_models["root"] / "base", tiny_models["expert_dirs"], tmp_path / "m", "average")
    merge_checkpoints(*args)
    with pytest.raises(EpmqError, match="already exists"):
        merge_checkpoints(*args)
    merge_checkpoints(*args, force=True)


def _broken_expert(tiny_models: dict, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    state = load_file(tiny_models["expert_dirs"][0] / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


OUT_BIAS = "encoder.layer.1.output.dense.bias"
OUT_WEIGHT = "encoder.layer.1.output.dense.weight"
WORDS = "embeddings.word_embeddings.weight"


def _set_nan(state: dict[str, torch.Tensor]) -> None:
    state[OUT_WEIGHT][0, 0] = float("nan")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(OUT_BIAS), f"missing tensor '{OUT_BIAS}'"),
        (lambda s: s.update({WORDS: torch.zeros(99, 32)}), r"shape \[99, 32\], base has \[100"),
        (_set_nan, f"tensor '{OUT_WEIGHT}' has 1 non-finite"),
    ],
)
def test_bad_expert_folder_is_named_and_leaves_no_output(
    tiny_models: dict, tmp_path: Path, edit, message: str
) -> None:
    broken = _broken_expert(tiny_models, tmp_path, edit)
    experts = [*tiny_models["expert_dirs"][1:], broken]
    out = tmp_path / "m"
    with pytest.raises(EpmqError, match=rf"expert {broken}: .*{message}"):
        merge_checkpoints(tiny_models["root"] / "base", experts, out, "average")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_folder_and_bad_method(tiny_models: dict, tmp_path: Path) -> None:
    with pytest.raises(EpmqError, match="does not exist"):
        merge_checkpoints(tmp_path / "nope", tiny_models["expert_dirs"], tmp_path / "m", "average")
    with pytest.raises(EpmqError, match="unknown merge method 'mean'"):
        merge_checkpoints(
            tiny_models["root"] / "base", tiny_models["expert_dirs"], tmp_path / "m", "mean"
        )
    assert not (tmp_path / "m").exists()


class _RunsCode:
    """Unpickling it creates ``marker``: what a crafted ``.bin`` file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "ran"))


def test_bin_with_pickled_code_is_refused_unrun(tiny_models: dict, tmp_path: Path) -> None:
    """``.bin`` weights are read with ``torch.load(weights_only=True)``: a pickled object that
    would run code is refused naming the file, never unpickled, and nothing is written."""
    expert, marker = tmp_path / "crafted", tmp_path / "marker"
    expert.mkdir()
    src = tiny_models["expert_dirs"][0]
    (expert / "config.json").write_text((src / "config.json").read_text())
    state = {**load_file(src / "model.safetensors"), "payload": _RunsCode(marker)}
    torch.save(state, expert / "pytorch_model.bin")
    base = tiny_models["root"] / "base"
    with pytest.raises(EpmqError, match=r"crafted/pytorch_model\.bin"):
        merge_checkpoints(base, [expert], tmp_path / "m", "average")
    assert not marker.exists() and not (tmp_path / "m").exists()
