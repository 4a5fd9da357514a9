"""AWQ: epmq's ``awq`` solver against llm-compressor's ``AWQModifier`` on a tiny Llama.

Both quantize the same model (random Llama, its norms' weights spread log-uniformly over
``[0.1, 3.1]`` as trained norms are uneven; no grouped-query attention, so V -> O folds in both)
to 4 bits, groups of 128, asymmetric, from the same calibration token ids, on the CPU:

- ours: ``quantize_model(..., method="awq", grid=QuantGrid(4, 128))`` (x_source quantized,
  true-sequential), with and without ``duo_scaling``, and RTN / GPTQ for reference;
- theirs: ``oneshot`` with ``AWQModifier()`` (its defaults: duo scaling, 20 grid points, Llama
  mappings: input_layernorm -> q/k/v, v -> o, post_attention_layernorm -> gate/up, up -> down)
  then ``QuantizationModifier(scheme="W4A16_ASYM")`` (min-max RTN, group 128).

The loss is the mean squared error of the logits against the unquantized model's on held-out
token ids (``mse``), and its ratio to llm-compressor's. The layer-level table prints, for one
block, each linear's proxy loss ``tr[(Q − W) S (Q − W)ᵀ]`` for RTN, GPTQ and AWQ under the same
statistics (``x_source="merged"``: every solver sees the unquantized inputs).

    python benchmarks/bench_awq.py [--layers 2] [--hidden 256] [--json awq.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from epmq.calib import EngineOptions, quantize_model
from epmq.quant import QuantGrid

GRID = QuantGrid(4, 128)


def make_model(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
        max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(torch.rand(hidden) * 3 + 0.1)
            layer.post_attention_layernorm.weight.mul_(torch.rand(hidden) * 3 + 0.1)
    return model


def token_ids(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def mse(model: torch.nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    return float((model(input_ids=ids).logits.float() - reference).pow(2).mean())


def ours(
    base: torch.nn.Module, calib: torch.Tensor, method: str, **params: Any
) -> tuple[torch.nn.Module, float]:
    model = copy.deepcopy(base)
    batches = {"calib": [{"input_ids": calib[i : i + 8]} for i in range(0, len(calib), 8)]}
    start = time.perf_counter()
    quantize_model(
        model,
        None,
        batches,
        method=method,
        grid=GRID,
        **params,
        engine=EngineOptions(progress=False),
    )
    return model, time.perf_counter() - start


def theirs(base: torch.nn.Module, calib: torch.Tensor) -> tuple[torch.nn.Module, float] | None:
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
    except Exception as exc:  # not installed, or not importable beside this torch/transformers
        print(f"llm-compressor not usable here ({type(exc).__name__}: {exc}); ours only")
        return None
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(int(base.config.vocab_size))}
    tokenizer = PreTrainedTokenizerFast(  # oneshot wants a processor; the ids are given
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")), unk_token="w0"
    )
    from llmcompressor.pipelines.cache import IntermediatesCache

    # 0.14's AWQ pins its cached activations (a host-to-device transfer optimisation), which
    # raises without an accelerator: on the CPU pinning is a no-op
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    folder = tempfile.mkdtemp(prefix="bench_awq_")
    base.save_pretrained(folder)  # oneshot reads the model's config from its folder
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    data = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    recipe = [
        AWQModifier(),
        QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"]),
    ]
    start = time.perf_counter()
    oneshot(
        model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
        num_calibration_samples=len(calib), max_seq_length=calib.shape[1], batch_size=8,
        shuffle_calibration_samples=False,
    )  # fmt: skip
    return model, time.perf_counter() - start


def layer_table(base: torch.nn.Module, calib: torch.Tensor, block: int) -> dict[str, dict]:
    """Per linear of ``block``: the proxy loss of RTN, GPTQ and AWQ under one set of stats."""
    batches = {"calib": [{"input_ids": calib[i : i + 8]} for i in range(0, len(calib), 8)]}
    table: dict[str, dict] = {}
    for method in ("rtn", "gptq", "awq"):
        run = quantize_model(
            copy.deepcopy(base),
            None,
            batches,
            method=method,
            grid=GRID,
            x_source="merged",
            engine=EngineOptions(progress=False),
        )
        for record in run.layers:
            if f"layers.{block}." in record.name:
                short = record.name.split(f"layers.{block}.")[1]
                table.setdefault(short, {})[method] = record.proxy_loss
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    base = make_model(args.hidden, args.layers, args.vocab)
    calib = token_ids(args.calib, args.length, args.vocab, seed=1)
    held = token_ids(16, args.length, args.vocab, seed=2)
    with torch.no_grad():
        reference = base(input_ids=held).logits.float()
    rows: dict[str, dict[str, float]] = {}
    for label, method, params in [
        ("rtn", "rtn", {}),
        ("gptq", "gptq", {}),
        ("awq", "awq", {}),
        ("awq duo", "awq", {"duo_scaling": True}),
        ("awq clip", "awq", {"clip": True}),
    ]:
        model, seconds = ours(base, calib, method, **params)
        rows[f"ours {label}"] = {"seconds": seconds, "mse": mse(model, reference, held)}
    got = theirs(base, calib)
    if got is not None:
        model, seconds = got
        rows["llm-compressor awq"] = {"seconds": seconds, "mse": mse(model, reference, held)}
    base_mse = rows.get("llm-compressor awq", {}).get("mse")
    print(
        f"tiny Llama {args.layers}x{args.hidden}, W4 g128 asym, {args.calib}x{args.length} tokens"
    )
    for name, row in rows.items():
        ratio = "" if base_mse is None else f"  mse/theirs {row['mse'] / base_mse:.3f}"
        print(f"{name:20s} {row['seconds']:7.2f}s  logits mse {row['mse']:.4e}{ratio}")
    table = layer_table(base, calib, block=0)
    print("block 0, proxy loss per linear (same statistics):   rtn        gptq       awq")
    for name, losses in table.items():
        print(f"  {name:28s} " + " ".join(f"{losses[m]:10.4e}" for m in ("rtn", "gptq", "awq")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "block0": table, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
