"""Tiny Hugging Face checkpoints built from a config at test time: a base and experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


def save_model(state: dict[str, torch.Tensor], folder: Path, **kwargs: object) -> Path:
    """Save a tiny BERT with the given weights via ``save_pretrained``."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG))
    model.load_state_dict(state)
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Base (single file and sharded), three experts (one sharded), their state dicts."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base_model = BertModel(BertConfig(**CONFIG))
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    base_model.save_pretrained(root / "base")
    (root / "base" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    save_model(base_state, root / "base_sharded", max_shard_size="30KB")
    experts, dirs = [], []
    gen = torch.Generator().manual_seed(1)
    for i in range(3):
        state = {
            k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base_state.items()
        }
        kwargs = {"max_shard_size": "40KB"} if i == 1 else {}
        dirs.append(save_model(state, root / f"expert{i}", **kwargs))
        experts.append(state)
    return {"root": root, "base_state": base_state, "experts": experts, "expert_dirs": dirs}
