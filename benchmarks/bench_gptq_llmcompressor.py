"""GPTQ solver time and proxy loss: epmq's ``gptq`` against llm-compressor's layer-level solver.

Both solve the same random layer under the same Hessian, one after the other in this process,
alternating for ``--repeats`` rounds; the medians are reported, with the ratio ours/theirs.

- ``ours``: :func:`epmq.quant.gptq` with its defaults (block 128, percdamp 0.01, each group's
  scales fitted when the solver enters it, on the error-updated columns, as the reference does);
- ``ours_static``: the same with ``static_groups=True`` (scales fitted up front on the original
  weights, which is what llm-compressor does: same algorithm, same grid as ``theirs``);
- theirs: llm-compressor's ``quantize_weight`` (``llmcompressor.modifiers.gptq.gptq_quantize``,
  block 128, percdamp 0.01) with scales and zero points from its ``memoryless_minmax`` observer
  on the weight, which is how its ``GPTQModifier`` calls it. The observer is timed with it; the
  copies of W and H that it overwrites are made outside the timed region.

Inputs: W ~ N(0, 1) [out, in]; correlated activations X = diag(s) M Z with Z ~ N(0, 1)
[in, tokens], M = I + N(0, 1/in) and channel scales s log-normal (a few strong channels, as in
real layers); H = X X^T / tokens. Both results are scored the same way: the proxy loss
``tr[(W - Q) H (W - Q)^T]`` (float32 products, accumulated in float64).

    python benchmarks/bench_gptq_llmcompressor.py --sizes 768x768,4096x4096,11008x4096
    python benchmarks/bench_gptq_llmcompressor.py --device cuda --json gptq.json

Without llm-compressor installed (``pip install llmcompressor``; it is not a dependency of
epmq) only our solver is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from epmq.quant import QuantGrid, gptq, proxy_loss

Solver = Callable[[Tensor, Tensor], Tensor]


def make_layer(out: int, inp: int, tokens: int, seed: int, device: str) -> tuple[Tensor, Tensor]:
    """Random weight [out, in] and Hessian [in, in] of random correlated activations."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.eye(inp) + torch.randn(inp, inp, generator=g) / inp**0.5
    scale = torch.exp(0.5 * torch.randn(inp, 1, generator=g))
    x = scale * (mix @ torch.randn(inp, tokens, generator=g))
    return w.to(device), (x @ x.T / tokens).to(device)


def ours(grid: QuantGrid, static_groups: bool = False) -> Solver:
    def solve(w: Tensor, h: Tensor) -> Tensor:
        return gptq(w, h, grid, static_groups=static_groups).weight

    return solve


def theirs(bits: int, group_size: int, symmetric: bool) -> Solver | None:
    """llm-compressor's solver as its GPTQModifier calls it, or None when not installed."""
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from llmcompressor.observers import Observer
    except Exception as exc:  # not installed, or not importable beside this torch/transformers
        print(f"llm-compressor not usable here ({type(exc).__name__}: {exc}); timing ours only")
        return None
    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size
    )

    def solve(w: Tensor, h: Tensor) -> Tensor:
        observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
        observer(w)
        qp = observer.get_qparams()
        q, _, _ = quantize_weight(
            w[None], h[None], qp["scale"][None], qp["zero_point"][None], None, args,
            blocksize=128, percdamp=0.01,
        )  # fmt: skip
        return q[0]

    return solve


def timed(solve: Solver, w: Tensor, h: Tensor, own_copy: bool) -> tuple[float, Tensor]:
    """Seconds of one solve (inputs copied first when the solver overwrites them)."""
    if own_copy:
        w, h = w.clone(), h.clone()
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    start = time.perf_counter()
    q = solve(w, h)
    if q.is_cuda:
        torch.cuda.synchronize(q.device)
    return time.perf_counter() - start, q


def run_size(
    out: int, inp: int, ns: argparse.Namespace, solvers: dict[str, Solver]
) -> list[dict[str, Any]]:
    """Alternating timed runs of every solver on one layer; one row per solver."""
    w, h = make_layer(out, inp, ns.tokens, ns.seed, ns.device)
    times: dict[str, list[float]] = {name: [] for name in solvers}
    losses: dict[str, float] = {}
    for name, solve in solvers.items():  # warm-up (first-call allocations, lazy imports)
        timed(solve, w, h, own_copy=name == "theirs")
    for _ in range(ns.repeats):
        for name, solve in solvers.items():
            seconds, q = timed(solve, w, h, own_copy=name == "theirs")
            times[name].append(seconds)
            assert q.device == w.device, f"{name} returned {q.device} for a {w.device} input"
            losses[name] = proxy_loss(q.float(), w, h)
    rows = []
    for name in solvers:
        row: dict[str, Any] = {"size": f"{out}x{inp}", "device": ns.device, "solver": name}
        row["seconds"] = statistics.median(times[name])
        row["all_seconds"] = times[name]
        row["loss"] = losses[name]
        if "theirs" in solvers:
            row["time_ratio"] = row["seconds"] / statistics.median(times["theirs"])
            row["loss_ratio"] = losses[name] / losses["theirs"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="768x768,4096x4096", help="comma list of OUTxIN")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric grid")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the random X")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    symmetric = not ns.asymmetric
    grid = QuantGrid(ns.bits, ns.group_size, symmetric)
    solvers = {"ours": ours(grid), "ours_static": ours(grid, static_groups=True)}
    other = theirs(ns.bits, ns.group_size, symmetric)
    if other is None:
        print("llm-compressor is not installed: timing epmq's gptq alone")
    else:
        solvers["theirs"] = other
    print(
        f"{ns.bits}-bit g{ns.group_size} {'symmetric' if symmetric else 'asymmetric'}, "
        f"device={ns.device} threads={ns.threads} tokens={ns.tokens} repeats={ns.repeats} "
        f"torch={torch.__version__}; median seconds of alternating runs; ratios to theirs"
    )
    head = ("size", "solver", "seconds", "ratio", "proxy_loss", "loss_ratio")
    print(" ".join(f"{h:>{n}}" for h, n in zip(head, (11, 11, 8, 6, 11, 10), strict=True)))
    rows = []
    for size in ns.sizes.split(","):
        out, inp = (int(v) for v in size.lower().split("x"))
        for row in run_size(out, inp, ns, solvers):
            rows.append(row)
            ratio = f"{row['time_ratio']:6.2f}" if "time_ratio" in row else f"{'-':>6}"
            loss_ratio = f"{row['loss_ratio']:10.4f}" if "loss_ratio" in row else f"{'-':>10}"
            print(
                f"{row['size']:>11} {row['solver']:>11} {row['seconds']:8.3f} {ratio} "
                f"{row['loss']:11.5g} {loss_ratio}",
                flush=True,
            )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
