"""Benchmark the calibration engine: wall time and peak memory, GPTQ vs E-PMQ.

A BERT-base-sized encoder (hidden 768, 12 layers, intermediate 3072, random init from a
config) is saved with K experts (base + random task vectors) as safetensors folders; each
(method, K) runs in a fresh child process that loads the merged model, reads the experts block
by block and reports its wall time, CPU time (user + system) and peak RSS (``ru_maxrss``).
Calibration: random tokens, ``--examples`` per task of ``--seq`` tokens. Printed per run: wall
and CPU time, solve time, peak RSS and peak / model size, the 1-minute load average when it
finished; per K: the E-PMQ / GPTQ ratios of wall time, CPU time and peak RSS.

    python benchmarks/bench_calibration.py                  # K = 2 and 8, 128 x 64 tokens
    python benchmarks/bench_calibration.py --quick          # 2 layers, 32 examples per task
    python benchmarks/bench_calibration.py --json rows.json # also write every row as JSON

Wall times depend on CPU load: on a shared machine, compare CPU times and ratios.
"""

from __future__ import annotations

import argparse
import gc
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
    import transformers
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=args.intermediate or 4 * args.hidden,
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
    transformers.logging.disable_progress_bar()
    base.save_pretrained(root / "merged")


def child(args: argparse.Namespace) -> None:
    """Run one (method, K) calibration and print a JSON line of figures."""
    import torch
    import transformers

    from epmq.calib import EngineOptions, SafetensorsExpert, quantize_model
    from epmq.models.bert import BertAdapter, load_bert
    from epmq.quant import QuantGrid
    from epmq.quant.solvers import get_solver

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    root = Path(args.root)
    model = load_bert(root / "merged", add_pooling_layer=False)
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
    gc.collect()
    rss_start = status_bytes("VmRSS")
    reset = reset_peak_rss()
    solver = get_solver(args.method)
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    run = quantize_model(
        model,
        BertAdapter(),
        calib,
        method=args.method,
        grid=QuantGrid(args.bits, group_size=args.group_size),
        experts=experts if solver.reads_experts or args.x_source == "expert" else None,
        x_source=args.x_source,
        **({"alpha": 0.1} if any(p.name == "alpha" for p in solver.params) else {}),
        engine=EngineOptions(progress=False),
    )
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    calib_peak = status_bytes("VmHWM") if reset else None
    solve = sum(r.seconds for r in run.layers)
    print(
        json.dumps(
            {
                "method": args.method,
                "k": args.k,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "solve_seconds": solve,
                "peak_bytes": peak,
                "rss_after_load_bytes": rss_before,
                "rss_start_bytes": rss_start,
                "calibration_peak_bytes": calib_peak,
                "model_bytes": size,
                "linears": len(run.layers),
            }
        )
    )


def status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (``VmHWM``) so it measures calibration only (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_bytes("VmHWM") is not None


def start_peaks(cuda: bool) -> tuple[int | None, bool]:
    """Reset the peak counters before a run: (RSS now, whether VmHWM could be reset)."""
    import torch

    from epmq.devices import release_freed_memory

    gc.collect()
    release_freed_memory()  # else a run reuses what earlier ones freed and reads low
    rss_start = status_bytes("VmRSS")
    reset = reset_peak_rss()  # VmHWM from here on: the run's own peak
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rss_start, reset


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (less sensitive to load than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def print_row(method: str, k: int, row: dict) -> None:
    """One run's figures: times, peak RSS (process; calibration alone) against the model."""
    gib, model = 2**30, row["model_bytes"]
    calib = row.get("calibration_peak_bytes")
    calib_text = "" if calib is None else f"; calibration peak {calib / gib:.2f} GiB"
    print(
        f"  {method:5s} K={k}: {row['seconds']:7.1f}s"
        f" (CPU {row['cpu_seconds']:.1f}s, solve {row['solve_seconds']:.1f}s)"
        f"  peak RSS {row['peak_bytes'] / gib:.2f} GiB = {row['peak_bytes'] / model:.1f} x model"
        f" ({model / gib:.2f} GiB){calib_text}"
        + ("" if calib is None else f" = {calib / model:.1f} x model")
        + f"; load {row['load_average']:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 8], help="values of K")
    parser.add_argument("--methods", nargs="+", default=["gptq", "epmq"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072, help="FFN width (0: 4 x hidden)")
    parser.add_argument("--examples", type=int, default=128, help="examples per task")
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--x-source", default="quantized")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 layers, 32 examples per task")
    parser.add_argument("--json", help="write every row (and the settings) to this JSON file")
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
    if not args.intermediate:
        args.intermediate = 4 * args.hidden
    print(
        f"BERT hidden={args.hidden} layers={args.layers} intermediate={args.intermediate}; "
        f"{args.examples} x {args.seq} tokens "
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
                out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                row["load_average"] = os.getloadavg()[0]
                rows.append(row)
                print_row(method, k, row)
        by = {(r["method"], r["k"]): r for r in rows}
        if ("gptq", k) in by and ("epmq", k) in by:
            epmq, gptq = by[("epmq", k)], by[("gptq", k)]
            print(
                f"  E-PMQ / GPTQ at K={k}: time {epmq['seconds'] / gptq['seconds']:.2f},"
                f" CPU time {epmq['cpu_seconds'] / gptq['cpu_seconds']:.2f},"
                f" peak RSS {epmq['peak_bytes'] / gptq['peak_bytes']:.2f}"
            )
        if args.json:
            settings = {n: v for n, v in vars(args).items() if n not in ("child", "root", "k")}
            Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
