"""Tiny BERT experts and calibration data for the calibration-engine tests (helpers)."""

from __future__ import annotations

import copy

import torch
from transformers import BertConfig, BertModel

from epmq.calib.statistics import flatten_tokens

HIDDEN = 32
LAYERS = 2
VOCAB = 60
TASKS = ("alpha", "beta", "gamma")


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def make_base(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    model = BertModel(tiny_config(), add_pooling_layer=False)
    return model.eval()


def make_experts(base: BertModel, k: int = 3, scale: float = 0.08) -> list[dict[str, torch.Tensor]]:
    """Experts = base + a random task vector on every encoder weight (linears and norms)."""
    gen = torch.Generator().manual_seed(1)
    experts = []
    for _ in range(k):
        state = {}
        for name, value in base.state_dict().items():
            value = value.clone()
            if name.startswith("encoder.") and value.is_floating_point():
                value += scale * value.std() * torch.randn(value.shape, generator=gen)
            state[name] = value
        experts.append(state)
    return experts


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def make_calib(n_batches: int = 2, batch: int = 4, seq: int = 10) -> dict[str, list[dict]]:
    """Per task: token ids from a task-specific third of the vocabulary, some padding."""
    gen = torch.Generator().manual_seed(2)
    calib: dict[str, list[dict]] = {}
    span = VOCAB // len(TASKS)
    for t, task in enumerate(TASKS):
        batches = []
        for _ in range(n_batches):
            ids = torch.randint(t * span, (t + 1) * span, (batch, seq), generator=gen)
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[0, seq - 3 :] = 0
            batches.append({"input_ids": ids, "attention_mask": mask})
        calib[task] = batches
    return calib


class Setup:
    """Base model, experts (state dicts) and the merged (averaged) model."""

    def __init__(self) -> None:
        self.base = make_base()
        self.experts = make_experts(self.base)
        self.merged_state = average(self.experts)
        self.calib = make_calib()

    def merged(self) -> BertModel:
        model = copy.deepcopy(self.base)
        model.load_state_dict(self.merged_state)
        return model.eval()

    def expert_model(self, i: int) -> BertModel:
        model = copy.deepcopy(self.base)
        model.load_state_dict(self.experts[i])
        return model.eval()


@torch.no_grad()
def outputs(model: BertModel, batches: list[dict]) -> list[torch.Tensor]:
    return [model(**b).last_hidden_state for b in batches]


def task_error(model: BertModel, setup: Setup) -> float:
    """Σ_i ‖f(X_i) − f_expert_i(X_i)‖² over the calibration batches (real tokens only)."""
    total = 0.0
    for i, (task, batches) in enumerate(setup.calib.items()):
        expert = setup.expert_model(i)
        for got, want, b in zip(
            outputs(model, batches), outputs(expert, batches), batches, strict=True
        ):
            mask = b["attention_mask"].bool()
            total += float(((got - want)[mask] ** 2).sum())
        del task
    return total


@torch.no_grad()
def linear_inputs(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Every encoder linear's real-token inputs over ``batches`` (float64 rows)."""
    seen: dict[str, list[torch.Tensor]] = {}
    mask: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder."):

            def hook(m, args, name=name) -> None:
                seen.setdefault(name, []).append(flatten_tokens(args[0], mask[0]).double())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].bool()]
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}
