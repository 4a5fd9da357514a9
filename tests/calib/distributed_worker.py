"""A rank of the distributed-calibration test (a helper module, importable by spawned ranks).

Each rank quantizes the tiny BERT of :mod:`calib_fixtures` on its shard of every task's
batches (rank r: batches r, r + R, ...) and saves what it solved to ``out/rank{r}.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from calib_fixtures import Setup, make_calib

from epmq.calib import EngineOptions, quantize_model
from epmq.calib.distributed import GramReducer
from epmq.errors import EpmqError
from epmq.quant import QuantGrid

METHODS = ("gptq", "epmq", "epmq+bias")  # epmq+bias: E-PMQ with bias_correction=True
GRID = QuantGrid(4, group_size=16)
BATCHES = 4


def solved(setup: Setup, calib: dict, method: str, distributed: bool | None) -> dict:
    """Quantize a fresh merged model; its codes, scales, zeros, weights and token counts."""
    model = setup.merged()
    method, _, bias = method.partition("+")
    experts = setup.experts if method == "epmq" else None
    params = {"bias_correction": True} if bias else {}
    run = quantize_model(
        model,
        None,
        calib,
        method=method,
        grid=GRID,
        experts=experts,
        **params,
        engine=EngineOptions(progress=False, distributed=distributed),
    )
    return {
        "results": {
            name: {key: getattr(r, key) for key in ("weight", "codes", "scales", "zeros")}
            for name, r in run.results.items()
        },
        "tokens": {r.name: r.tokens for r in run.layers},
        "biases": {
            n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")
        },
        "world_size": run.settings.get("world_size", 1),
    }


def run_rank(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One rank: join the gloo group, quantize its shard with every method, save (with the
    names of the linears this rank solved itself)."""
    import epmq.calib.block as block_module

    solves: list[str] = []
    real = block_module.solve_layer

    def counting(problem, options):  # type: ignore[no-untyped-def]
        solves.append(problem.name)
        return real(problem, options)

    block_module.solve_layer = counting
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        setup = Setup()
        calib = make_calib(n_batches=BATCHES)
        shard = {task: batches[rank::world_size] for task, batches in calib.items()}
        saved: dict = {}
        for method in METHODS:
            solves.clear()
            saved[method] = {**solved(setup, shard, method, None), "solves": list(solves)}
        try:
            GramReducer().check_same("seed", rank)
        except EpmqError as exc:
            saved["check_same"] = str(exc)
        torch.save(saved, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
