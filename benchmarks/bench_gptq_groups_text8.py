"""GPTQ group scales on real layers: fitted as the solver goes (default) or up front (static).

Proxy loss of :func:`epmq.quant.gptq` with its default, dynamic group scales (each group's
scales fitted when the solver enters it, on the error-updated columns, as the IST-DASLab
reference does) against ``static_groups=True`` (fitted on the original weights, as
llm-compressor does), on the linears of the text8 suite's pretrained MiniLM (6 layers × q, k,
v, attention output, intermediate, output). Each linear's Hessian ``X X^T / n`` is captured
with forward hooks over the real (unpadded) tokens of ``--examples`` calibration examples of
each task in ``--tasks``. Prints the static/dynamic loss ratio per linear and the ratio of
the summed losses per encoder layer, for every ``--bits``.

    python benchmarks/bench_gptq_groups_text8.py --bits 4,3 --group-size 128
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor, nn

from epmq.calib.statistics import flatten_tokens
from epmq.quant import GramAccumulator, QuantGrid, gptq
from epmq.suites import get_suite


def capture_hessians(tasks: list[str], examples: int) -> dict[str, tuple[Tensor, Tensor]]:
    """``name -> (weight, H)`` for every linear of the suite's base encoder."""
    suite = get_suite("text8")
    encoder = suite.load_encoder().eval()
    linears = {n: m for n, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    linears = {n: m for n, m in linears.items() if n.startswith("encoder.layer.")}
    grams = {n: GramAccumulator(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    mask: list[Tensor] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def record(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            grams[name].add(flatten_tokens(inputs[0], mask[0]).double())

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for task in tasks:
            for batch in suite.calibration_batches(task, examples=examples):
                mask[:] = [batch["attention_mask"]]
                encoder(**batch)
    for handle in handles:
        handle.remove()
    return {n: (m.weight.detach().float(), grams[n].gram.float()) for n, m in linears.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="imdb_sentiment,noun_supersense")
    parser.add_argument("--examples", type=int, default=128, help="per task")
    parser.add_argument("--bits", default="4,3", help="comma list")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid")
    ns = parser.parse_args()
    layers = capture_hessians(ns.tasks.split(","), ns.examples)
    kind = "symmetric" if ns.symmetric else "asymmetric (the default)"
    print(f"tasks={ns.tasks} examples={ns.examples} g{ns.group_size} {kind}")
    for bits in (int(b) for b in ns.bits.split(",")):
        grid = QuantGrid(bits, ns.group_size, ns.symmetric)
        sums: dict[str, list[float]] = {}
        for name, (w, h) in layers.items():
            dynamic = gptq(w, h, grid).proxy_loss
            static = gptq(w, h, grid, static_groups=True).proxy_loss
            layer = name.split(".")[2]
            sums.setdefault(layer, [0.0, 0.0])
            sums[layer][0] += dynamic
            sums[layer][1] += static
            print(f"{bits}-bit {name:<40} {tuple(w.shape)} static/dynamic {static / dynamic:.4f}")
        for layer, (dynamic, static) in sums.items():
            print(f"{bits}-bit layer {layer}: summed loss static/dynamic {static / dynamic:.4f}")


if __name__ == "__main__":
    main()
