"""Peak memory of the streaming merge (``epmq.merging.merge_checkpoints``) of K experts.

Builds a BERT-base-sized model from its config (no download), writes a base and K perturbed
experts as safetensors folders in a temp dir, then merges them in child processes and reports
each child's peak resident memory (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) minus the
same figure for a child that only imports epmq, torch and safetensors. Target: below
2 x (one model's size) + K x (largest tensor).

    python benchmarks/bench_streaming_merge.py                 # K=8, task_arithmetic and ties
    python benchmarks/bench_streaming_merge.py --experts 4 --layers 4 --methods dare
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024


def build(root: Path, experts: int, layers: int, hidden: int) -> tuple[int, int]:
    """Write base and experts; return (model bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        vocab_size=30522,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    model.save_pretrained(root / "base")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if k in _saved_names(root / "base")}
    sizes = [t.numel() * t.element_size() for t in state.values()]
    gen = torch.Generator().manual_seed(1)
    for i in range(experts):
        folder = root / f"expert{i}"
        folder.mkdir()
        shutil.copy(root / "base" / "config.json", folder / "config.json")
        noisy = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()
        }
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
        del noisy
    return sum(sizes), max(sizes)


def _saved_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def worker(args: argparse.Namespace) -> None:
    """The measured child: import only, or one streaming merge."""
    import safetensors  # noqa: F401
    import torch

    from epmq.merging import merge_checkpoints

    torch.set_num_threads(2)
    if args.worker == "baseline":
        return
    root = Path(args.root)
    experts = sorted(root.glob("expert*"))
    merge_checkpoints(root / "base", experts, root / f"out_{args.worker}", args.worker, force=True)


def measure(args: argparse.Namespace) -> None:
    """Run one worker as a child and print its peak RSS (KiB) and wall time as JSON."""
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--root", args.root, "--worker", args.measure]
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"maxrss_kib": peak, "seconds": time.perf_counter() - start}))


def run_measured(root: Path, what: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--root", str(root), "--measure", what]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.measure:
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        model_bytes, largest = build(root, args.experts, args.layers, args.hidden)
        print(f"built base + {args.experts} experts in {time.perf_counter() - start:.0f} s")
        base = run_measured(root, "baseline")
        target = 2 * model_bytes + args.experts * largest
        print(f"model size            {model_bytes / MB:9.1f} MiB (fp32)")
        print(f"largest tensor        {largest / MB:9.1f} MiB")
        print(f"import baseline RSS   {base['maxrss_kib'] / 1024:9.1f} MiB")
        print(f"target (2 x model + {args.experts} x largest) {target / MB:9.1f} MiB")
        for method in args.methods:
            result = run_measured(root, method)
            extra = (result["maxrss_kib"] - base["maxrss_kib"]) * 1024
            print(
                f"{method:16s} peak {result['maxrss_kib'] / 1024:8.1f} MiB, above baseline "
                f"{extra / MB:8.1f} MiB = {extra / model_bytes:5.2f} x model, "
                f"{extra / target:5.2f} x target, {result['seconds']:6.1f} s"
            )


if __name__ == "__main__":
    main()
