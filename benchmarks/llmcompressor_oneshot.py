"""llm-compressor's GPTQ through ``oneshot``, for benchmarks that compare it with ours.

:func:`oneshot_gptq` quantizes a model read from a saved folder with
``GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])`` — 4-bit, groups of
128, symmetric, llm-compressor's other defaults (block size 128, dampening 0.01, static
activation ordering) — on the given token ids, through its sequential pipeline (one decoder
layer at a time on the device, the rest offloaded to the CPU), in place, and returns the wall
time of ``oneshot``; None, with one printed line, when llm-compressor cannot be imported beside
this torch / transformers. :func:`load` reads the model to give it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def _tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over ``vocab_size`` ids: oneshot wants a processor, the ids are
    given."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")), unk_token="w0"
    )


def load(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM saved in ``folder``, in ``dtype``, on the CPU (oneshot onloads it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def oneshot_gptq(model: torch.nn.Module, ids: torch.Tensor, *, batch_size: int) -> float | None:
    """Quantize ``model`` in place with llm-compressor's W4A16 GPTQ, calibrated on the rows of
    ``ids`` ([sequences, tokens]); the seconds ``oneshot`` took, or None when not usable."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except Exception as exc:  # not installed, or not importable beside this torch/transformers
        print(f"llm-compressor not usable here ({type(exc).__name__}: {exc}); ours only")
        return None
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(
        model=model, tokenizer=_tokenizer(int(model.config.vocab_size)), dataset=data,
        recipe=recipe, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
        batch_size=batch_size, shuffle_calibration_samples=False, pipeline="sequential",
    )  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
