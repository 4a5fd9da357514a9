"""``epmq demo``: the main job on a built-in suite (default ``text8``), end to end."""

from __future__ import annotations

from pathlib import Path

import typer

from epmq.cli.app import app
from epmq.errors import EpmqError


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EpmqError(f"--{what}: expected comma-separated integers, got {text!r}") from None


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EpmqError(f"--{what}: expected comma-separated numbers, got {text!r}") from None


DEMO_MERGES = {
    "task_arithmetic": {"scale": 0.3},
    "ties": {"density": 0.2, "scale": 0.3, "merge_func": "sum"},
    "regmean": {},
    "average": {},
    "dare": {"drop_rate": 0.9, "combine": "task_arithmetic", "scale": 0.3},
}


@app.command("demo")
def demo(
    suite: str = typer.Option("text8", help="Built-in suite (see epmq.suites.list_suites)."),
    merges: str = typer.Option("task_arithmetic,ties,regmean", help="Merges, comma-separated."),
    methods: str | None = typer.Option(
        None, help="Quantizers, comma-separated (default rtn,gptq,awq,epmq; --quick: no awq)."
    ),
    bits: str = typer.Option("4,3", help="Bit widths, comma-separated."),
    group_sizes: str = typer.Option(
        "-1", help="Group sizes (-1: per channel); -1,128 adds the g128 grids."
    ),
    alpha: float = typer.Option(0.1, help="E-PMQ anchor strength α."),
    x_source: str | None = typer.Option(
        None, help="E-PMQ's inputs: expert (its default), quantized (GPTQ's way) or merged."
    ),
    alpha_sweep: str = typer.Option(
        "", help="α values swept on the first merge, e.g. 0,0.01,0.1,1 (none by default)."
    ),
    max_test: int | None = typer.Option(None, help="Evaluate at most N test examples per task."),
    eval_dtype: str = typer.Option(
        "float32", help="Evaluation precision: float32, or bfloat16 (autocast; fast on AMX CPUs)."
    ),
    quick: bool = typer.Option(False, "--quick", help="A fast first look: fewer of everything."),
    out: Path = typer.Option(Path("runs/demo"), help="Report folder."),
    cache_dir: Path | None = typer.Option(None, help="Cache root for the suite's experts."),
    force: bool = typer.Option(False, "--force", help="Overwrite the report folder."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a stopped run from its last finished model."
    ),
    seed: int = typer.Option(0, help="Seed of the experiment."),
    device: str = typer.Option("auto", help="Where to calibrate and evaluate: auto, cpu, cuda:N."),
) -> None:
    """Train or load the suite's experts, merge, quantize (RTN/GPTQ/E-PMQ), evaluate, report."""
    from epmq.experiment.config import parse_config
    from epmq.experiment.session import run_session

    names = [m.strip() for m in merges.split(",") if m.strip()]
    unknown = [m for m in names if m not in DEMO_MERGES]
    if unknown:
        raise EpmqError(
            f"--merges: unknown merge {unknown[0]!r}; choose from {sorted(DEMO_MERGES)}"
        )
    sweep = _floats(alpha_sweep, "alpha-sweep")
    default_methods = "rtn,gptq,epmq" if quick else "rtn,gptq,awq,epmq"
    quant = {
        "methods": [m.strip() for m in (methods or default_methods).split(",") if m.strip()],
        "bits": _ints(bits, "bits"),
        "group_sizes": _ints(group_sizes, "group-sizes"),
        "alpha": alpha,
        "x_source": x_source,
        "alpha_sweep": sweep,
        "x_source_study": True,
    }
    if quick:
        quant.update(bits=quant["bits"][-1:], group_sizes=quant["group_sizes"][:1])
        # no α sweep and no unrounded W* rows: each costs an E-PMQ solve, and together they
        # took over a third of the look's time (8 min 51 s cold with them on the idle machine)
        quant.update(alpha_sweep=[], x_source_study=False, evaluate_target=False)
        names = names[:2]
        max_test = max_test or 200
    config = parse_config(
        {
            "name": f"demo-{suite}",
            "seed": seed,
            "suite": suite,
            "device": device,
            "merges": [{"method": m, "params": DEMO_MERGES[m]} for m in names],
            "quantization": quant,
            "evaluation": {"max_test": max_test, "dtype": eval_dtype},
            "output": {"dir": str(out)},
        },
        source="epmq demo options",
    )
    run_session(config, quick=quick, cache_dir=cache_dir, force=force, resume=resume)
