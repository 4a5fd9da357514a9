"""Benchmark distributed calibration: one process against ``torchrun`` ranks, same CPU budget.

The pool of :mod:`bench_device` (a Llama-style model, K experts from random low-rank deltas,
saved under a temporary folder) is calibrated by child processes: once by one process with
``--threads`` threads, then by ``torchrun --nproc-per-node N`` ranks with ``threads / N``
threads each (gloo; each rank calibrates its shard of every task's batches, the statistics are
all-reduced and the solves shared out). Printed per method: wall time of ``quantize_model``
in each setting, the speedup, the machine's ceiling for it (N independent one-process copies
run at once: what N cores give N jobs, shared caches and memory bandwidth included), and how
many integer codes agree with the one-process run (all of them when every process has the same
threads: the statistics' float64 sums do not depend on the order of the batches; other thread
counts change the float32 products' rounding).

    python benchmarks/bench_distributed.py                       # 2 ranks vs 1, 2 threads
    python benchmarks/bench_distributed.py --threads 1           # one core per rank
    python benchmarks/bench_distributed.py --ranks 4 --threads 4 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from subprocess import PIPE

from bench_device import PRESETS, RUNS, build, calibration, declared


def child(args: argparse.Namespace) -> None:
    """One process (or rank): load the merge, calibrate its shard, save codes, print time."""
    import torch
    from transformers import LlamaForCausalLM

    from epmq.calib import EngineOptions, SafetensorsExpert, quantize_model
    from epmq.calib.distributed import launched_group, shard
    from epmq.models.llama import LlamaAdapter
    from epmq.quant import QuantGrid

    torch.set_num_threads(args.child_threads)
    root = Path(args.child_root)
    model = LlamaForCausalLM.from_pretrained(root / "merged", local_files_only=True).eval()
    experts = [SafetensorsExpert(root / f"expert{i}", name=f"task{i}") for i in range(args.experts)]
    method, x_source = RUNS[args.child_run]
    with launched_group(None) as (rank, world):
        calib = shard(calibration(args), rank, world)
        start = time.perf_counter()
        run = quantize_model(
            model,
            LlamaAdapter(),
            calib,
            method=method,
            grid=QuantGrid(bits=4, group_size=128, symmetric=True),
            experts=experts,
            x_source=x_source,
            **declared(method, alpha=0.1),
            engine=EngineOptions(progress=False),
        )
        seconds = time.perf_counter() - start
        if rank == 0:
            if not args.child_copy:
                codes = {name: r.codes for name, r in run.results.items()}
                torch.save(codes, root / f"codes-{args.child_run}-{world}.pt")
            loss = sum(r.proxy_loss for r in run.layers) / len(run.layers)
            row = {"run": args.child_run, "ranks": world, "seconds": seconds, "loss": loss}
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    parser.add_argument("--runs", default="gptq,epmq-quantized")
    for key, value in PRESETS["cpu"].items():
        if key not in ("device", "dtype"):
            parser.add_argument(f"--{key}", type=type(value), default=value)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--delta", type=float, default=0.5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child-copy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype, args.device = "float32", "cpu"
    if args.child:
        child(args)
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="epmq-bench-dist-") as tmp:
        root = Path(tmp)
        model, _, _ = build(args, root)
        model.save_pretrained(root / "merged")
        del model
        script = str(Path(__file__).resolve())
        keys = [k for k in PRESETS["cpu"] if k not in ("device", "dtype")]
        shared = [f"--{k}={getattr(args, k)}" for k in keys]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        per_rank = max(1, args.threads // args.ranks)

        def launch(run: str, ranks: int, threads: int, copies: int = 1) -> list[dict]:
            """Start ``copies`` independent jobs at once (each one process, or ``ranks``
            torchrun ranks, of ``threads`` threads); their JSON rows once all are done."""
            common = [*shared, "--child", f"--child-root={root}", f"--child-run={run}"]
            common.append(f"--child-threads={threads}")
            if copies > 1:
                common.append("--child-copy")
            launch = [sys.executable]
            if ranks > 1:
                launch += ["-m", "torch.distributed.run", "--standalone"]
                launch += [f"--nproc-per-node={ranks}"]
            command = [*launch, script, *common]
            jobs = [
                subprocess.Popen(command, stdout=PIPE, stderr=PIPE, text=True, env=env)
                for _ in range(copies)
            ]
            rows = []
            for job in jobs:
                stdout, stderr = job.communicate()
                if job.returncode != 0:
                    raise SystemExit(stderr[-4000:])
                rows.append(json.loads(stdout.strip().splitlines()[-1]))
            return rows

        for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
            (single,) = launch(run, 1, args.threads)
            (ranked,) = launch(run, args.ranks, per_rank)
            # what the machine gives R jobs at once: R independent one-process copies, each
            # with a rank's threads; the ideal R-rank time is then their time / R
            copies = launch(run, 1, per_rank, copies=args.ranks)
            ideal = max(row["seconds"] for row in copies) / args.ranks
            one = torch.load(root / f"codes-{run}-1.pt")
            many = torch.load(root / f"codes-{run}-{args.ranks}.pt")
            agree = sum(int((one[n] == many[n]).sum()) for n in one)
            total = sum(one[n].numel() for n in one)
            print(
                f"{run}: 1 process x {args.threads} threads {single['seconds']:.1f} s, "
                f"{args.ranks} ranks x {per_rank} threads {ranked['seconds']:.1f} s, "
                f"speedup {single['seconds'] / ranked['seconds']:.2f}x "
                f"(the machine's ceiling {single['seconds'] / ideal:.2f}x: {args.ranks} "
                f"independent copies took {args.ranks * ideal:.1f} s at once); "
                f"codes equal {100 * agree / total:.2f} %, mean proxy loss "
                f"{single['loss']:.4g} / {ranked['loss']:.4g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
