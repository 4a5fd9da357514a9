"""Time and peak memory of the quantization solvers on CPU.

For every layer size (out x in) this measures, each case in a fresh process:

- ``gptq``: :func:`epmq.quant.gptq` (blocked lazy updates, as in the reference);
- ``plain``: the same algorithm column by column (no blocks), kept in this file;
- ``epmq K=k``: :func:`epmq.quant.epmq_target` on k experts, then :func:`epmq.quant.gptq`;

and prints a table with wall seconds, CPU seconds of the process (less sensitive to other
load on a shared machine), peak memory and the E-PMQ/GPTQ time ratios (``ratio``: wall,
``cpu_ratio``: CPU time; ``target_s``: the epmq_target part of the E-PMQ wall time).

Memory: peak resident set size above the inputs, in MiB. Each case runs in its own process;
after the inputs are built the kernel's high-water mark is reset (``/proc/self/clear_refs``
= 5) and ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the solve minus the RSS before
it is reported. Where that reset is not allowed the delta is against ``ru_maxrss`` before the
solve, which can hide peaks lower than the input-building peak (marked ``*``).

Inputs: random N(0, 1) weights; Gram of task i is ``X_i X_i^T / n`` with
``X_i = D_i X``, X a random [in, tokens] matrix and D_i a random positive diagonal.

    python benchmarks/bench_quant_solvers.py                       # the full table
    python benchmarks/bench_quant_solvers.py --sizes 768x768 --experts 2,8   # quick
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from typing import Any

import torch
from torch import Tensor

from epmq.quant import QuantGrid, epmq_target, gptq, proxy_loss

DEFAULT_SIZES = "768x768,3072x768,4096x4096,11008x4096"


def plain_gptq(w: Tensor, h: Tensor, grid: QuantGrid, percdamp: float = 0.01) -> Tensor:
    """Straightforward GPTQ: after each column, update *all* later columns (no lazy blocks)."""
    w, h = w.clone(), h.clone()
    cols = w.shape[1]
    dead = (torch.diagonal(h) == 0).nonzero().flatten()
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.diagonal(h).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    gs = cols if grid.group_size == -1 else grid.group_size
    q = torch.empty_like(w)
    for j in range(cols):
        if j % gs == 0:
            scale, zero = grid.fit(w[:, j : j + gs])
        q[:, j] = grid.dequantize(grid.quantize(w[:, j], scale, zero), scale, zero)
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:].addr_(err, u[j, j:], alpha=-1.0)
    return q


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(out: int, inp: int, k: int, tokens: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(inp, tokens, generator=g)
    base = x @ x.T / tokens
    del x
    grams = []
    for _ in range(max(k, 1)):
        d = torch.rand(inp, generator=g) + 0.5
        grams.append(base * d[:, None] * d[None, :])  # (D X)(D X)^T / n
    merged = torch.randn(out, inp, generator=g)
    experts = [merged + 0.1 * torch.randn(out, inp, generator=g) for _ in range(k)]
    return {"merged": merged, "experts": experts, "grams": grams, "h": sum(grams)}


def _case(args: tuple[str, int, int, int, int, int, int, int]) -> dict[str, Any]:
    solver, out, inp, k, tokens, bits, group_size, threads = args
    torch.set_num_threads(threads)
    grid = QuantGrid(bits, group_size)
    data = _inputs(out, inp, k, tokens, seed=0)
    input_mib = sum(t.numel() * 4 for t in [data["merged"], *data["experts"], *data["grams"]])
    rss0 = _rss_kib()
    exact = _reset_peak()
    base_peak = rss0 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row: dict[str, Any] = {"solver": solver, "size": f"{out}x{inp}", "k": k}
    start, cpu_start = time.perf_counter(), time.process_time()
    if solver == "gptq":
        res = gptq(data["merged"], data["h"], grid)
        row["loss"] = res.proxy_loss
    elif solver == "plain":
        q = plain_gptq(data["merged"], data["h"], grid)
    else:
        target, h = epmq_target(data["experts"], data["grams"], data["merged"], alpha=0.1)
        row["target_s"] = time.perf_counter() - start
        res = gptq(target, h, grid)
        row["loss"] = res.proxy_loss
    row["seconds"] = time.perf_counter() - start
    row["cpu_s"] = time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row["peak_mib"] = (peak - base_peak) / 1024
    row["exact_peak"] = exact
    row["input_mib"] = input_mib / 2**20
    if solver == "gptq":  # how much of gptq is the exact proxy loss (one [out,in]x[in,in] matmul)
        t = time.perf_counter()
        proxy_loss(res.weight, data["merged"], data["h"])
        row["loss_s"] = time.perf_counter() - t
        # The unit of E-PMQ's extra cost: one W_i H_i product (best of 3).
        times = []
        for _ in range(3):
            t = time.perf_counter()
            data["merged"] @ data["h"]
            times.append(time.perf_counter() - t)
        row["matmul_s"] = min(times)
    if solver == "plain":
        row["loss"] = proxy_loss(q, data["merged"], data["h"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of OUTxIN")
    parser.add_argument("--experts", default="2,8,20", help="comma list of K for E-PMQ")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the random X")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-plain", action="store_true", help="skip the column-by-column run")
    ns = parser.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in ns.sizes.split(",")]
    ks = [int(v) for v in ns.experts.split(",")]
    solvers = ["gptq"] + ([] if ns.no_plain else ["plain"]) + [f"epmq{k}" for k in ks]
    print(
        f"bits={ns.bits} group_size={ns.group_size} tokens={ns.tokens} threads={ns.threads} "
        f"torch={torch.__version__}; memory = peak RSS above inputs (MiB), fresh process per case"
    )
    header = (
        f"{'size':>11} {'solver':>8} {'seconds':>9} {'target_s':>9} {'ratio':>6} "
        f"{'cpu_s':>8} {'cpu_ratio':>9} {'extra/K':>8} "
        f"{'peak_MiB':>9} {'input_MiB':>9} {'proxy_loss':>12}"
    )
    print(
        "extra/K: E-PMQ's wall time above GPTQ's per expert, in units of one [out,in]x[in,in] "
        "matmul on this machine (1.0 = exactly one matmul per expert)"
    )
    print(header)
    ctx = mp.get_context("spawn")
    for out, inp in sizes:
        gptq_s = gptq_cpu = matmul_s = None
        for solver in solvers:
            k = int(solver[4:]) if solver.startswith("epmq") else 0
            job = (solver[:4] if k else solver, out, inp, k, ns.tokens, ns.bits)
            with ctx.Pool(1) as pool:
                row = pool.apply(_case, ((*job, ns.group_size, ns.threads),))
            if solver == "gptq":
                gptq_s, gptq_cpu, matmul_s = row["seconds"], row["cpu_s"], row["matmul_s"]
            per_expert = f"{'':8}"
            if k and gptq_s and matmul_s:
                per_expert = f"{(row['seconds'] - gptq_s) / (k * matmul_s):8.2f}"
            name = f"epmq K={k}" if k else solver
            ratio = f"{row['seconds'] / gptq_s:6.2f}" if gptq_s else f"{'':6}"
            cpu_ratio = f"{row['cpu_s'] / gptq_cpu:9.2f}" if gptq_cpu else f"{'':9}"
            target = f"{row['target_s']:9.2f}" if "target_s" in row else f"{'':9}"
            mark = "" if row["exact_peak"] else "*"
            print(
                f"{row['size']:>11} {name:>8} {row['seconds']:9.2f} {target} {ratio} "
                f"{row['cpu_s']:8.2f} {cpu_ratio} {per_expert} "
                f"{row['peak_mib']:8.0f}{mark:1} {row['input_mib']:9.0f} {row['loss']:12.5g}",
                flush=True,
            )
            if "loss_s" in row:
                print(
                    f"{'':11} {'':8} (of which proxy_loss {row['loss_s']:.2f} s; one matmul "
                    f"{row['matmul_s']:.3f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
