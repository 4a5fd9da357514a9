"""Checkpoint size on disk of the demo model: text8 task-arithmetic merge, E-PMQ, exported.

Builds the task-arithmetic merge of the text8 experts (cached by ``epmq demo``), quantizes it
with E-PMQ at each requested bit width, exports compressed-tensors (symmetric, so plain
``from_pretrained`` loads it) and prints sizes on disk against a float16 checkpoint, plus the
accuracy of the exported checkpoint as reloaded by transformers.

    python benchmarks/bench_demo_export.py [--bits 4 3 8] [--group-size 128] [--max-test 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from epmq.calib import SafetensorsExpert, quantize_model
from epmq.export import export_checkpoint
from epmq.merging import merge
from epmq.quant import QuantGrid
from epmq.suites import get_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--max-test", type=int, default=200)
    args = parser.parse_args()

    suite = get_suite("text8")
    models = suite.prepare(progress=False)
    tasks = suite.task_names
    base = suite.load_encoder()
    experts = [suite.load_encoder(models.expert_dirs[t]).state_dict() for t in tasks]
    merged_state = merge(base.state_dict(), experts, "task_arithmetic", scale=0.3)
    del experts
    heads = {t: suite.load_head(models.expert_dirs[t]) for t in tasks}
    calib = {t: suite.calibration_batches(t, batch_size=32) for t in tasks}
    sources = [SafetensorsExpert(models.expert_dirs[t], name=t) for t in tasks]

    print(
        f"{'bits':>4} {'group':>5} {'weights MiB':>11} {'fp16 MiB':>8} {'ratio':>6} "
        f"{'avg acc (reloaded)':>18} {'seconds':>7}"
    )
    for bits in args.bits:
        start = time.perf_counter()
        model = suite.load_encoder()
        model.load_state_dict(merged_state)
        grid = QuantGrid(bits=bits, group_size=args.group_size, symmetric=True)
        run = quantize_model(
            model,
            None,
            calib,
            method="epmq",
            grid=grid,
            experts=sources,
            alpha=args.alpha,
            progress=False,
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "export"
            summary = export_checkpoint(
                model, run.results, out, format="compressed-tensors", base_dir=suite.base_dir
            )
            reloaded = suite.load_encoder(out)
            acc = suite.evaluate(reloaded, heads, max_examples=args.max_test)
            average = sum(acc.values()) / len(acc)
        mib = 1024 * 1024
        print(
            f"{bits:>4} {args.group_size:>5} {summary.weights_bytes / mib:>11.2f} "
            f"{summary.float16_bytes / mib:>8.2f} {summary.ratio_vs_float16:>6.3f} "
            f"{100 * average:>18.1f} {time.perf_counter() - start:>7.1f}"
        )
        torch.manual_seed(0)


if __name__ == "__main__":
    main()
