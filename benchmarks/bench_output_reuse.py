"""Calibration time with and without the exact reuse of finished sub-modules' outputs.

A MiniLM-sized BERT encoder (hidden 384, 6 layers, intermediate 1536, random init from a config)
is quantized by GPTQ (3-bit, per channel, true-sequential) on random tokens, 8 tasks of
``--examples`` examples of ``--seq`` tokens, with :mod:`epmq.calib.reuse` on and off
(alternating, ``--repeats`` times each). Prints the best wall time of each and their ratio, and
checks that both runs give the same weights bit for bit.

    python benchmarks/bench_output_reuse.py [--examples 128] [--seq 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import BertConfig, BertModel

import epmq.calib.block
from epmq.calib import EngineOptions, quantize_model
from epmq.calib.reuse import FinalOutputs
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid


class NoReuse(FinalOutputs):
    """Serves nothing: every pass recomputes every sub-module."""

    def _candidates(self) -> list[str]:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, args.seq)
    calib = {
        f"task{t}": [
            {"input_ids": torch.randint(0, config.vocab_size, shape, generator=gen)}
            for _ in range(max(1, args.examples // args.batch))
        ]
        for t in range(8)
    }
    best = {"reuse": float("inf"), "recompute": float("inf")}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(args.repeats):
        for mode, cls in (("reuse", FinalOutputs), ("recompute", NoReuse)):
            epmq.calib.block.FinalOutputs = cls  # type: ignore[misc]
            copy_ = copy.deepcopy(model)
            start = time.perf_counter()
            quantize_model(
                copy_,
                BertAdapter(),
                calib,
                method="gptq",
                grid=QuantGrid(3),
                engine=EngineOptions(progress=False),
            )
            best[mode] = min(best[mode], time.perf_counter() - start)
            weights[mode] = {n: p.detach().clone() for n, p in copy_.named_parameters()}
    epmq.calib.block.FinalOutputs = FinalOutputs  # type: ignore[misc]
    same = all(torch.equal(weights["reuse"][n], w) for n, w in weights["recompute"].items())
    print(
        f"GPTQ 3-bit, 6 x 384 BERT, 8 tasks x {args.examples} x {args.seq} tokens, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"  recompute every pass: {best['recompute']:.2f} s")
    print(f"  reuse final outputs:  {best['reuse']:.2f} s")
    print(f"  ratio reuse / recompute: {best['reuse'] / best['recompute']:.2f}")
    print(f"  weights identical: {same}")


if __name__ == "__main__":
    main()
