"""Llama-style decoders: ``LlamaForCausalLM`` / ``LlamaModel``, and Mistral, Qwen2 (same layout).

One stage: ``model.layers.N`` (``layers.N`` for the bare ``*Model``). Each decoder layer is
called as ``layer(hidden_states, attention_mask=causal_mask, position_embeddings=(cos, sin),
position_ids=..., <cache>=None, use_cache=False)`` and returns the new hidden states; the
causal mask and the rotary ``position_embeddings`` (from ``model.rotary_emb``) are captured as
the model computes them and replayed unchanged for every layer; the cache is switched off.
Linears per block in true-sequential order: ``self_attn.{q,k,v}_proj``, ``self_attn.o_proj``,
``mlp.{gate,up}_proj``, ``mlp.down_proj``.

Models whose layers use different attention masks (Qwen2 with sliding-window layers mixed with
full-attention layers, ``config.layer_types``) are refused: every layer replays the first
layer's mask.

Evaluation for classification: :func:`score_continuations` picks, per prompt, the label text
whose continuation tokens have the highest log-likelihood.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.models.adapter import Batch, BlockAdapter, Stage, register_adapter
from epmq.models.folder import from_folder, read_config

_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@register_adapter
class LlamaAdapter(BlockAdapter):
    """Adapter for Llama-style decoders (one stage: the decoder's layer list)."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    tasks = "epmq.heads.text_to_text:CausalLMTasks"
    sequential_groups = _GROUPS
    input_producers: ClassVar[Mapping[str, str]] = {
        "self_attn.q_proj": "input_layernorm",
        "self_attn.k_proj": "input_layernorm",
        "self_attn.v_proj": "input_layernorm",
        "self_attn.o_proj": "self_attn.v_proj",  # softmax(QKᵀ)V is linear in V's channels
        "mlp.gate_proj": "post_attention_layernorm",
        "mlp.up_proj": "post_attention_layernorm",
        "mlp.down_proj": "mlp.up_proj",  # act(gate) * up is linear in up's channels
    }
    norm_sites = (("input_layernorm", None), ("post_attention_layernorm", "self_attn.o_proj"))

    def stages(self, model: nn.Module) -> list[Stage]:
        layer_types = getattr(getattr(model, "config", None), "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            raise EpmqError(
                f"model {type(model).__name__}: config field 'layer_types' mixes "
                f"{', '.join(sorted(set(layer_types)))} layers; only models whose layers share "
                "one attention mask are supported"
            )
        return [self.find_stage(model, "decoder", ("model.layers", "layers"))]

    def run_model(self, model: nn.Module, batch: Batch) -> None:
        """Run the model without a cache (``labels`` are dropped: no loss is needed)."""
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise EpmqError(
                f"Llama calibration batch has no 'input_ids' (keys: {', '.join(batch)})"
            )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model(**inputs, use_cache=False)

    @staticmethod
    def load(path: str | Path, **kwargs: Any) -> nn.Module:
        """:func:`load_llama`."""
        return load_llama(path, **kwargs)


def load_llama(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a Llama / Mistral / Qwen2 causal LM from a local folder (no hub access), in eval
    mode, with ``AutoModelForCausalLM``; a compressed-tensors export loads dequantized
    (:func:`~epmq.models.folder.from_folder`)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model_type = read_config(path).get("model_type")
    if model_type not in LlamaAdapter.model_types:
        raise EpmqError(
            f"{path / 'config.json'}: model_type {model_type!r} is not one of "
            f"{', '.join(LlamaAdapter.model_types)}"
        )
    model = from_folder(AutoModelForCausalLM, path, **kwargs)
    model.eval()
    return model


# -- evaluation -------------------------------------------------------------------------------
def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@torch.no_grad()
def continuation_log_likelihoods(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    label_texts: Sequence[str],
) -> Tensor:
    """``[len(prompts), len(label_texts)]``: summed log-probabilities of each continuation.

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), the label text
    without, and the label's tokens are scored after the prompt's. The label texts of one
    prompt run as one right-padded batch.
    """
    if not label_texts:
        raise EpmqError("score_continuations: label_texts is empty")
    conts = [_ids(tokenizer, text, special=False) for text in label_texts]
    for text, ids in zip(label_texts, conts, strict=True):
        if not ids:
            raise EpmqError(f"label text {text!r} tokenizes to nothing")
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    device = next(model.parameters()).device
    rows = []
    for prompt in prompts:
        head = _ids(tokenizer, prompt, special=True)
        if not head:
            raise EpmqError(f"prompt {prompt!r} tokenizes to nothing")
        seqs = [head + cont for cont in conts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).logits
        logp = logits.float().log_softmax(-1).cpu()
        scores = []
        for row, cont in enumerate(conts):
            positions = torch.arange(len(head) - 1, len(head) - 1 + len(cont))
            scores.append(logp[row, positions, torch.tensor(cont)].sum())
        rows.append(torch.stack(scores))
    return torch.stack(rows)


def score_continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    label_texts: Sequence[str],
) -> Tensor:
    """Predicted label index per prompt: the continuation with the highest log-likelihood."""
    return continuation_log_likelihoods(model, tokenizer, prompts, label_texts).argmax(dim=1)
