"""Checkpoint size on disk of the demo model at several bit widths, and its reloaded accuracy.

Builds the task-arithmetic merge (scale 0.3) of the text8 experts (cached by ``epmq demo``;
nothing is trained here), quantizes it with E-PMQ at each grid — ``--bits`` with
``--group-size``, plus ``--channel-bits`` per output channel; symmetric unless ``--asymmetric``
— and exports every requested format. Each export's size on disk is printed against a float16
checkpoint of the same model; compressed-tensors exports are reloaded by transformers (through
``epmq.suites.classifier.load_encoder``) and evaluated on the first ``--max-test`` test
examples of every task. GPTQ folders are reloaded and evaluated the same way when gptqmodel and
optimum are installed (transformers loads them through GPTQModel's CPU kernel); otherwise only
their size is reported. The first row is the float merge itself.

    python benchmarks/bench_demo_export.py [--bits 8 4 3 2] [--group-size 128] \\
        [--channel-bits 4] [--formats compressed-tensors gptq] [--max-test 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

from epmq.calib import EngineOptions, SafetensorsExpert, quantize_model
from epmq.export import export_checkpoint, float16_checkpoint_bytes
from epmq.merging import merge
from epmq.quant import QuantGrid
from epmq.suites import get_suite
from epmq.suites.suite import Suite

MIB = 1024 * 1024
HAS_GPTQ_RUNTIME = all(importlib.util.find_spec(m) for m in ("gptqmodel", "optimum"))


def reload(suite: Suite, folder: Path, fmt: str) -> Any | None:
    """The exported encoder as a runtime loads it (None: no runtime for ``fmt`` here)."""
    if not fmt.startswith("gptq"):
        return suite.load_encoder(folder)
    if not HAS_GPTQ_RUNTIME:
        return None
    from transformers import BertModel

    model = BertModel.from_pretrained(
        folder, add_pooling_layer=False, device_map="cpu", dtype=torch.float32
    )
    return model.eval()


def cached_experts(suite: Suite) -> dict[str, Path]:
    """The suite's expert folders, refusing to train missing ones (run ``epmq demo`` first)."""
    missing = [t for t in suite.task_names if not (suite.expert_dir(t) / "config.json").is_file()]
    if missing:
        raise SystemExit(f"no cached text8 experts for {missing}; run `epmq demo` first")
    return suite.prepare(progress=False).expert_dirs


def row(name: str, grid: str, weights: int, fp16: int, accuracy: float | None) -> str:
    """One Markdown table row (accuracy ``-`` when the export was not reloaded)."""
    acc = "-" if accuracy is None else f"{100 * accuracy:.1f}"
    return (
        f"| {name} | {grid} | {weights / MIB:.2f} MiB | {fp16 / MIB:.2f} MiB | "
        f"{weights / fp16:.3f} | {acc} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 4, 3, 2])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--channel-bits", type=int, nargs="*", default=[4])
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--formats", nargs="+", default=["compressed-tensors", "gptq"])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--max-test", type=int, default=200)
    args = parser.parse_args()

    suite = get_suite("text8")
    expert_dirs = cached_experts(suite)
    tasks = suite.task_names
    base = suite.load_encoder()
    experts = [suite.load_encoder(expert_dirs[t]).state_dict() for t in tasks]
    merged_state = merge(base.state_dict(), experts, "task_arithmetic", scale=0.3)
    del experts
    heads = {t: suite.load_head(expert_dirs[t]) for t in tasks}
    calib = {t: suite.calibration_batches(t, batch_size=32) for t in tasks}
    sources = [SafetensorsExpert(expert_dirs[t], name=t) for t in tasks]

    def accuracy(encoder) -> float:
        acc = suite.evaluate(encoder, heads, max_examples=args.max_test)
        return sum(acc.values()) / len(acc)

    symmetric = not args.asymmetric
    grids = [(b, args.group_size) for b in args.bits] + [(b, -1) for b in args.channel_bits]
    kind = "symmetric" if symmetric else "asymmetric"
    print(
        f"text8 demo merge (task arithmetic 0.3), E-PMQ alpha {args.alpha}, {kind} grids, "
        f"average accuracy on the first {args.max_test} test examples of each task"
    )
    print("| export | grid | weights on disk | float16 checkpoint | ratio | avg accuracy |")
    print("|---|---|---|---|---|---|")
    base.load_state_dict(merged_state)
    fp16 = float16_checkpoint_bytes(base)
    print(row("float merge (not exported)", "-", fp16, fp16, accuracy(base)), flush=True)
    for bits, group_size in grids:
        start = time.perf_counter()
        model = suite.load_encoder()
        model.load_state_dict(merged_state)
        run = quantize_model(
            model,
            None,
            calib,
            method="epmq",
            grid=QuantGrid(bits=bits, group_size=group_size, symmetric=symmetric),
            experts=sources,
            alpha=args.alpha,
            engine=EngineOptions(progress=False),
        )
        seconds = time.perf_counter() - start
        grid = f"{bits}-bit, {'per channel' if group_size < 0 else f'g{group_size}'}"
        for fmt in args.formats:
            with tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()):
                out = Path(tmp) / "export"
                summary = export_checkpoint(
                    model, run.results, out, format=fmt, base_dir=suite.base_dir
                )
                encoder = reload(suite, out, fmt)
                acc = None if encoder is None else accuracy(encoder)
            print(row(fmt, grid, summary.weights_bytes, summary.float16_bytes, acc), flush=True)
        print(f"  ({grid}: E-PMQ took {seconds:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
