"""Benchmark the calibration engine: wall time and peak memory, GPTQ vs E-PMQ.

A BERT-base-sized encoder (hidden 768, 12 layers, random init from a config) is saved with K
experts (base + random task vectors) as safetensors folders; each (method, K) runs in a fresh
child process that loads the merged model, reads the experts block by block and reports its
wall time and peak RSS (``ru_maxrss``). Calibration: random tokens, ``--examples`` per task of
``--seq`` tokens.

    python benchmarks/bench_calibration.py                  # K = 2 and 8, 128 x 64 tokens
    python benchmarks/bench_calibration.py --quick          # 2 layers, 32 examples per task

Figures depend on CPU load: on a shared machine, compare ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_pool(root: Path, args: argparse.Namespace, k: int) -> None:
    """Save the merged model (average) and ``k`` expert folders under ``root``."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
    )
    base = BertModel(config, add_pooling_layer=False).eval()
    state = {n: v.detach().clone() for n, v in base.state_dict().items()}
    total = {n: torch.zeros_like(v) for n, v in state.items()}
    gen = torch.Generator().manual_seed(1)
    for i in range(k):
        expert = {}
        for name, value in state.items():
            if name.startswith("encoder.") and value.is_floating_point():
                value = value + 0.05 * value.std() * torch.randn(value.shape, generator=gen)
            expert[name] = value.contiguous()
            total[name] += value
        folder = root / f"expert{i}"
        folder.mkdir()
        save_file(expert, str(folder / "model.safetensors"))
        del expert
    base.load_state_dict({n: v / k for n, v in total.items()})
    base.save_pretrained(root / "merged")


def child(args: argparse.Namespace) -> None:
    """Run one (method, K) calibration and print a JSON line of figures."""
    import torch

    from epmq.calib import SafetensorsExpert, quantize_model
    from epmq.models.bert import BertAdapter, load_bert
    from epmq.quant import QuantGrid

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    model = load_bert(root / "merged")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = [SafetensorsExpert(root / f"expert{i}") for i in range(args.k)]
    gen = torch.Generator().manual_seed(2)
    calib = {}
    for i in range(args.k):
        batches = []
        for start in range(0, args.examples, args.batch):
            n = min(args.batch, args.examples - start)
            ids = torch.randint(1000, model.config.vocab_size, (n, args.seq), generator=gen)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        calib[f"task{i}"] = batches
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    run = quantize_model(
        model,
        BertAdapter(),
        calib,
        method=args.method,
        grid=QuantGrid(args.bits, group_size=args.group_size),
        experts=experts if args.method == "epmq" else None,
        alpha=0.1,
        x_source=args.x_source,
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    solve = sum(r.seconds for r in run.layers)
    print(
        json.dumps(
            {
                "method": args.method,
                "k": args.k,
                "seconds": seconds,
                "solve_seconds": solve,
                "peak_bytes": peak,
                "rss_after_load_bytes": rss_before,
                "model_bytes": size,
                "linears": len(run.layers),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 8], help="values of K")
    parser.add_argument("--methods", nargs="+", default=["gptq", "epmq"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--examples", type=int, default=128, help="examples per task")
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--x-source", default="quantized")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 layers, 32 examples per task")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.layers, args.examples = 2, 32
    print(
        f"BERT hidden={args.hidden} layers={args.layers}; {args.examples} x {args.seq} tokens "
        f"per task; {args.bits}-bit g{args.group_size}; x_source={args.x_source}; "
        f"{args.threads} threads; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    rows = []
    for k in args.experts:
        with tempfile.TemporaryDirectory(prefix="epmq-bench-") as tmp:
            t0 = time.perf_counter()
            build_pool(Path(tmp), args, k)
            print(f"K={k}: wrote merged model + {k} experts in {time.perf_counter() - t0:.0f}s")
            for method in args.methods:
                command = [sys.executable, __file__, "--child", "--root", tmp, "--k", str(k)]
                command += ["--method", method, "--layers", str(args.layers)]
                for flag in ("examples", "seq", "batch", "bits", "threads"):
                    command += [f"--{flag}", str(getattr(args, flag))]
                command += ["--group-size", str(args.group_size), "--x-source", args.x_source]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                gib = 2**30
                print(
                    f"  {method:5s} K={k}: {row['seconds']:7.1f}s"
                    f" (solve {row['solve_seconds']:.1f}s)"
                    f"  peak RSS {row['peak_bytes'] / gib:.2f} GiB"
                    f" = {row['peak_bytes'] / row['model_bytes']:.1f} x model"
                    f" ({row['model_bytes'] / gib:.2f} GiB; after load"
                    f" {row['rss_after_load_bytes'] / gib:.2f} GiB)"
                )
        by = {(r["method"], r["k"]): r for r in rows}
        if ("gptq", k) in by and ("epmq", k) in by:
            ratio = by[("epmq", k)]["seconds"] / by[("gptq", k)]["seconds"]
            print(f"  E-PMQ / GPTQ time ratio at K={k}: {ratio:.2f}")


if __name__ == "__main__":
    main()
