"""``epmq eval``: test accuracy of an encoder folder on every task of a suite.

    epmq eval --suite text8 --model DIR [--max-test N] [--json FILE] [--force]

``--model`` is a Hugging Face encoder folder: an expert, a merge, or a quantized export
(``dequantized``, or ``compressed-tensors``, dequantized on load; a ``gptq`` folder needs a GPTQ
runtime and is refused), loaded by :func:`epmq.suites.classifier.load_encoder`. The shared
encoder is evaluated with each task's own expert head (from ``suite.prepare()``, trained on
first use and cached), and a table of accuracies is printed; ``--json`` also writes them,
atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from epmq.cli.app import app
from epmq.errors import EpmqError


def evaluate_folder(
    suite: Any,
    folder: Path,
    *,
    max_test: int | None,
    batch_size: int,
    progress: bool,
    device: str = "cpu",
) -> dict[str, float]:
    """Accuracy per task of the encoder in ``folder`` with the suite's expert heads, its
    forwards on ``device`` (auto, cpu, cuda[:N])."""
    from epmq.devices import resolve_device

    target = resolve_device(device)
    encoder = suite.load_encoder(folder)  # a broken folder fails before the experts are built
    models = suite.prepare(progress=progress)
    heads = {task: suite.load_head(models.expert_dirs[task]) for task in suite.task_names}
    encoder = encoder.to(target)
    return suite.evaluate(encoder, heads, batch_size=batch_size, max_examples=max_test)


def average(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def format_table(accuracy: dict[str, float]) -> str:
    """Task and accuracy (%) per line, then the average."""
    width = max(len("average"), *(len(t) for t in accuracy))
    rows = [f"{'task':<{width}}  accuracy"]
    rows += [f"{task:<{width}}  {100 * acc:7.2f}%" for task, acc in accuracy.items()]
    rows.append(f"{'average':<{width}}  {100 * average(accuracy):7.2f}%")
    return "\n".join(rows)


@app.command("eval")
def eval_command(
    suite: Annotated[str | None, typer.Option("--suite", help="Suite name (text8, tiny).")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Encoder folder.")] = None,
    max_test: Annotated[
        int | None, typer.Option("--max-test", help="First N test examples per task.")
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the accuracies here.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json.")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Suite cache root (experts, probes).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The suite's quick settings.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Inference batch.")] = 128,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: Annotated[
        str, typer.Option("--device", help="Where to evaluate: auto, cpu, cuda[:N].")
    ] = "auto",
) -> None:
    """Evaluate an encoder folder on every task of a suite with the per-task expert heads."""
    from epmq.atomic import refuse_existing, refuse_overlap, write_json
    from epmq.models.folder import quantization_kwargs
    from epmq.suites import get_suite

    for flag, value in (("--suite", suite), ("--model", model)):
        if value is None:
            raise EpmqError(f"{flag} is required")
    assert suite is not None and model is not None
    if not model.is_dir():
        raise EpmqError(f"--model folder {model} does not exist")
    if max_test is not None and max_test < 1:
        raise EpmqError(f"--max-test must be >= 1, got {max_test}")
    if batch_size < 1:
        raise EpmqError(f"--batch-size must be >= 1, got {batch_size}")
    if json_file is not None:
        refuse_overlap(json_file, [("--model folder", model)])
        refuse_existing(json_file, force)
    quantization_kwargs(model)  # an unloadable folder fails before the suite is prepared
    the_suite = get_suite(suite, cache_dir=cache_dir, quick=quick)
    accuracy = evaluate_folder(
        the_suite, model, max_test=max_test, batch_size=batch_size, progress=progress,
        device=device,
    )  # fmt: skip
    typer.echo(format_table(accuracy))
    if json_file is not None:
        data = {
            "suite": the_suite.name,
            "suite_key": the_suite.key,
            "model": str(model),
            "max_test": max_test,
            "accuracy": accuracy,
            "average": average(accuracy),
        }
        write_json(json_file, data)
        typer.echo(f"wrote {json_file}")
