"""Tiny models of each family, quantized layer by layer, and their dequantized references."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from epmq.quant import QuantGrid, QuantResult, gptq, rtn

VOCAB = 100


def _bert_config() -> BertConfig:
    return BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
    )


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(_bert_config()).eval()


def tiny_bert_encoder() -> torch.nn.Module:
    """A ``BertModel`` without pooler: what the suites' encoders are."""
    torch.manual_seed(0)
    return BertModel(_bert_config(), add_pooling_layer=False).eval()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T5Config(
        d_model=64,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        d_kv=32,
        vocab_size=VOCAB,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_clip_vision() -> torch.nn.Module:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModel(config).eval()


def quantize_model(
    model: torch.nn.Module, skip: tuple[str, ...], grid: QuantGrid, *, act_order: bool = False
) -> dict[str, QuantResult]:
    """RTN (or act-order GPTQ on a synthetic Hessian) of every linear not matching ``skip``."""
    results: dict[str, QuantResult] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
            w = module.weight.detach()
            if act_order:
                x = torch.randn(w.shape[1], 256, generator=torch.Generator().manual_seed(7))
                x = x * torch.linspace(0.2, 2.0, w.shape[1]).flip(0).roll(5).unsqueeze(1)
                results[name] = gptq(w, x @ x.T / 256, grid, act_order=True)
            else:
                results[name] = rtn(w, grid)
    return results


def inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fixed inputs for ``model``: token ids (T5: and decoder ids) or pixel values."""
    gen = torch.Generator().manual_seed(3)
    if model.config.model_type == "clip_vision_model":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    ids = {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=gen)}
    if model.config.model_type == "t5":
        ids["decoder_input_ids"] = torch.randint(0, VOCAB, (2, 5), generator=gen)
    return ids


def outputs(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits (or last hidden states for an encoder) on :func:`inputs`."""
    with torch.no_grad():
        out = model(**inputs(model))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def dequantized_reference(model: torch.nn.Module, results, scale_dtype=torch.float32):
    """The in-memory model with every quantized weight replaced by its dequantization."""
    for name, r in results.items():
        scales = r.scales.to(scale_dtype).to(torch.float32)
        w = scales[:, r.g_idx.long()] * (r.codes.float() - r.zeros[:, r.g_idx.long()].float())
        model.get_submodule(name).weight.data.copy_(w)
    return outputs(model)
