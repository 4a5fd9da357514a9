"""Benchmark the calibration engine on a device: a Llama-style model, K experts on disk.

A Llama-style causal LM is built from a config (random weights) in ``--dtype``; K experts are
the base plus a random low-rank delta on every block linear (``--rank``), saved as safetensors
folders; the merged model is task arithmetic (s = 0.3) of them and waits in CPU memory. Each
run quantizes a fresh copy of the merge with ``quantize_model(..., device=--device)``: the
blocks are onloaded one at a time, activations and statistics live on the device. Printed per
run: wall time, seconds per block (median, max), GPU peak memory (``max_memory_allocated``)
against the bound "one block × (K + 2) + the block's activations + its statistics", the CPU
peak RSS of the run (``VmHWM`` reset before it) and, on the CPU, what calibration held (the
model plus the growth of RSS during the run) against the same bound plus the model; both
also against the bound plus what it leaves out whatever K (:func:`working_bytes`); the mean
proxy loss; the logits' mean squared error against the unquantized merge on held-out ids;
then each run's time over our GPTQ's. ``llmcompressor-gptq`` runs llm-compressor's GPTQ
(``oneshot``, W4A16: 4-bit g128 symmetric, its defaults) on the same merge, read back from a
saved folder, with the same calibration ids, on the same device, after ours: the same figures
(``benchmarks/llmcompressor_oneshot.py``). Every finished run is also appended to ``--json``
at once, so a run cut short keeps what it measured. With ``--offload-dir`` every run of ours
is made twice in turn, in memory and with its activations offloaded there, and the offloaded
/ in-memory ratios of wall time and memory are printed.

    python benchmarks/bench_device.py --preset gpu          # ~1.1B, K = 8, 4-bit g128, CUDA
    python benchmarks/bench_device.py --preset cpu          # a small model that runs in minutes
    python benchmarks/bench_device.py --preset gpu --seqs 128 --runs gptq,epmq-quantized
    python benchmarks/bench_device.py --preset cpu --offload-dir /tmp/offload

Runs: ``gptq`` (x_source quantized), ``epmq-quantized``, ``epmq-expert``,
``llmcompressor-gptq`` (skipped with one line where llm-compressor cannot be imported).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_calibration import start_peaks, status_bytes
from device_bound import bound_bytes, working_bytes

PRESETS: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads
    "gpu": dict(
        hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
        experts=8, seqs=32, tokens=2048, batch=8, dtype="bfloat16", device="cuda",
    ),
    "cpu": dict(
        hidden=256, layers=4, intermediate=768, heads=8, kv_heads=4, vocab=1000,
        experts=8, seqs=8, tokens=128, batch=4, dtype="float32", device="cpu",
    ),
}  # fmt: skip
THEIRS = "llmcompressor-gptq"  # llm-compressor's GPTQ through oneshot, for comparison
RUNS = {
    "gptq": ("gptq", "quantized"),
    "epmq-quantized": ("epmq", "quantized"),
    "epmq-expert": ("epmq", "expert"),
}


def declared(method: str, **settings: Any) -> dict[str, Any]:
    """The ``settings`` that ``method``'s solver declares as parameters (the others refuse)."""
    from epmq.quant.solvers import get_solver

    names = {p.name for p in get_solver(method).params}
    return {k: v for k, v in settings.items() if k in names}


def build(args: argparse.Namespace, root: Path) -> tuple[Any, dict[str, Any], list[Path]]:
    """The merged model (CPU, ``args.dtype``), its state, and the K expert folders."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.tokens), torch_dtype=args.dtype,
    )  # fmt: skip
    init = "cuda" if torch.cuda.is_available() else "cpu"  # random init is fast on a GPU
    torch.manual_seed(0)
    with torch.device(init):
        base = LlamaForCausalLM(config).to(dtype).eval()
    state = {n: v.detach() for n, v in base.state_dict().items()}
    linears = [n for n in state if ".layers." in n and n.endswith("_proj.weight")]
    gen = torch.Generator(device=init).manual_seed(1)
    merged = {n: v.float().clone() for n, v in state.items() if n in linears}
    folders = []
    for i in range(args.experts):
        expert = {}
        for name, value in state.items():
            if name in linears:
                out, inp = value.shape
                u = torch.randn(out, args.rank, generator=gen, device=init)
                v = torch.randn(args.rank, inp, generator=gen, device=init)
                delta = (u @ v) * (args.delta * value.float().std() / args.rank**0.5)
                merged[name] += 0.3 * delta
                value = (value.float() + delta).to(dtype)
            expert[name] = value.to("cpu").contiguous()
        folder = root / f"expert{i}"
        folder.mkdir()
        save_file(expert, str(folder / "model.safetensors"))
        folders.append(folder)
        del expert
    merged_state = {n: (merged[n].to(dtype) if n in merged else v).cpu() for n, v in state.items()}
    model = base.to("cpu")
    model.load_state_dict(merged_state)
    del base, merged
    if init == "cuda":
        torch.cuda.empty_cache()
    return model, merged_state, folders


def calibration(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """``args.seqs`` random sequences per task, each task drawing from its own token range."""
    import torch

    gen = torch.Generator().manual_seed(2)
    width = args.vocab // args.experts
    calib = {}
    for t in range(args.experts):
        batches = []
        for start in range(0, args.seqs, args.batch):
            n = min(args.batch, args.seqs - start)
            ids = torch.randint(t * width, (t + 1) * width, (n, args.tokens), generator=gen)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        calib[f"task{t}"] = batches
    return calib


def score_ids(args: argparse.Namespace) -> Any:
    """Held-out token ids over the whole vocabulary: 2 sequences of up to 128 tokens."""
    import torch

    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, args.vocab, (2, min(128, args.tokens)), generator=gen)


def logits(model: Any, ids: Any) -> Any:
    """``model``'s float32 logits on ``ids`` (CPU tensors), computed on the model's device."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def peak_fields(
    args: argparse.Namespace,
    model: Any,
    method: str,
    x_source: str,
    rss_start: int | None,
    reset: bool,
) -> dict[str, Any]:
    """The run's CPU peak RSS and GPU peak against the issue's bound (see the docstring)."""
    import torch

    row: dict[str, Any] = {}
    cuda = args.device.startswith("cuda")
    peak_rss = status_bytes("VmHWM") if reset else None  # else: the process's whole life
    if peak_rss is None:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["cpu_rss_start_gib"] = None if rss_start is None else round(rss_start / 2**30, 2)
    row["cpu_peak_rss_gib"] = round(peak_rss / 2**30, 2)
    if not cuda and rss_start is not None:
        # what calibration holds: the model plus the growth above the start (libraries, the
        # calibration data and the build's leftovers are not counted)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        held = peak_rss - rss_start + model_bytes
        bound = model_bytes + bound_bytes(args, model, method, x_source)
        row.update(
            cpu_held_gib=round(held / 2**30, 2),
            cpu_bound_gib=round(bound / 2**30, 2),
            cpu_held_over_bound=round(held / bound, 2),
            cpu_held_over_bound_with_working=round(held / (bound + working_bytes(args)), 2),
        )
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        bound = bound_bytes(args, model, method, x_source)
        row.update(
            gpu_peak_gib=round(peak / 2**30, 2),
            gpu_bound_gib=round(bound / 2**30, 2),
            gpu_peak_over_bound=round(peak / bound, 2),
            gpu_peak_over_bound_with_working=round(peak / (bound + working_bytes(args)), 2),
        )
    return row


def run_theirs(
    args: argparse.Namespace, model: Any, state: dict[str, Any], root: Path, reference: Any
) -> dict[str, Any] | None:
    """llm-compressor's GPTQ (``oneshot``, W4A16) on the same merge and calibration ids."""
    import torch
    from llmcompressor_oneshot import load, oneshot_gptq

    folder = root / "merged"
    if not folder.exists():
        model.load_state_dict(state)
        model.save_pretrained(folder)  # oneshot takes a transformers model; ours is in memory
    theirs = load(folder, getattr(torch, args.dtype))
    ids = torch.cat([b["input_ids"] for batches in calibration(args).values() for b in batches])
    rss_start, reset = start_peaks(args.device.startswith("cuda"))
    wall = oneshot_gptq(theirs, ids, batch_size=args.batch)
    if wall is None:
        return None
    row = {"run": THEIRS, "offload": False, "method": "gptq (llm-compressor oneshot)",
           "x_source": "quantized", "device": args.device, "wall_s": round(wall, 2)}  # fmt: skip
    row.update(peak_fields(args, theirs, "gptq", "quantized", rss_start, reset))
    row["logits_mse"] = float((logits(theirs, score_ids(args)) - reference).pow(2).mean())
    del theirs
    return row


def run_one(
    args: argparse.Namespace,
    name: str,
    model: Any,
    state: dict[str, Any],
    folders: list[Path],
    reference: Any,
    offload_dir: Path | None = None,
) -> dict[str, Any]:
    import torch

    from epmq.calib import EngineOptions, SafetensorsExpert, quantize_model
    from epmq.models.llama import LlamaAdapter
    from epmq.quant import QuantGrid

    method, x_source = RUNS[name]
    model.load_state_dict(state)  # a fresh copy of the merge
    calib = calibration(args)
    experts = [SafetensorsExpert(f, name=f"task{i}") for i, f in enumerate(folders)]
    cuda = args.device.startswith("cuda")
    rss_start, reset = start_peaks(cuda)
    stamps: list[float] = []
    start = time.perf_counter()

    def block_done(stage: str, index: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    run = quantize_model(
        model,
        LlamaAdapter(),
        calib,
        method=method,
        grid=QuantGrid(bits=4, group_size=128, symmetric=True),
        experts=experts,
        x_source=x_source,
        **declared(method, alpha=0.1),
        engine=EngineOptions(
            progress=False,
            on_block_end=block_done,
            device=args.device,
            **({} if offload_dir is None else {"offload_dir": offload_dir}),
        ),
    )
    wall = time.perf_counter() - start
    per_block = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    losses = [r.proxy_loss for r in run.layers]
    row = {
        "run": name,
        "offload": offload_dir is not None,
        "method": method,
        "x_source": x_source,
        "device": args.device,
        "wall_s": round(wall, 2),
        "block_s_median": round(statistics.median(per_block), 3),
        "block_s_max": round(max(per_block), 3),
        "solve_s": round(sum(r.seconds for r in run.layers), 2),
        "mean_proxy_loss": float(sum(losses) / len(losses)),
    }
    row.update(peak_fields(args, model, method, x_source, rss_start, reset))
    row["logits_mse"] = float((logits(model, score_ids(args)) - reference).pow(2).mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for key, value in PRESETS["cpu"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--rank", type=int, default=16, help="rank of each expert's deltas")
    parser.add_argument("--delta", type=float, default=0.5, help="delta size × weight std")
    parser.add_argument("--runs", default=",".join([*RUNS, THEIRS]), help="comma-separated runs")
    parser.add_argument("--json", type=Path, default=None, help="append every row here")
    parser.add_argument(
        "--offload-dir",
        type=Path,
        default=None,
        help="also make each of our runs with its activations offloaded there (in turn)",
    )
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS and r != THEIRS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join([*RUNS, THEIRS])}")
    with tempfile.TemporaryDirectory(prefix="epmq-bench-device-") as tmp:
        clock = time.perf_counter()
        model, state, folders = build(args, Path(tmp))
        params = sum(p.numel() for p in model.parameters())
        header = {
            "preset": args.preset,
            "params_b": round(params / 1e9, 3),
            "dtype": args.dtype,
            "experts": args.experts,
            "tokens_per_task": args.seqs * args.tokens,
            "build_s": round(time.perf_counter() - clock, 1),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
        print(json.dumps(header), flush=True)
        rows = []
        reference = logits(model, score_ids(args))  # the unquantized merge's
        offloads = [None] if args.offload_dir is None else [None, args.offload_dir]
        for name in runs:
            for offload_dir in offloads if name != THEIRS else [None]:
                if name == THEIRS:
                    row = run_theirs(args, model, state, Path(tmp), reference)
                else:
                    row = run_one(args, name, model, state, folders, reference, offload_dir)
                if row is None:
                    continue
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json is not None:
                    with args.json.open("a") as handle:
                        handle.write(json.dumps({**header, **row}) + "\n")
    in_memory = [r for r in rows if not r["offload"]]
    gptq = next((r for r in in_memory if r["run"] == "gptq"), None)
    if gptq is not None:
        for row in in_memory:
            if row is not gptq:
                ratio = row["wall_s"] / gptq["wall_s"]
                print(f"{row['run']} / gptq wall time: {ratio:.2f}", flush=True)
    for row in rows:
        if row["offload"]:
            plain = next(r for r in in_memory if r["run"] == row["run"])
            time_ratio = row["wall_s"] / plain["wall_s"]
            memory = "cpu_held_gib" if "cpu_held_gib" in row else "cpu_peak_rss_gib"
            memory_ratio = row[memory] / plain[memory]
            print(
                f"{row['run']} offloaded / in memory: wall {time_ratio:.2f}, "
                f"{memory} {memory_ratio:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
