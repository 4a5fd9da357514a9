"""The experiment report: one Markdown table, honest gap analysis, JSON and PNG plots.

:func:`render_markdown` turns :class:`~epmq.eval.results.Results` into Markdown: the accuracy
table (tasks, average, average normalised by the experts), the gaps (experts → merge, merge →
GPTQ, and how much E-PMQ recovers), where E-PMQ's gain over GPTQ comes from (a better merge
or better rounding), the α sweep, and the settings. :func:`write_report` writes
``report.md``, ``results.json`` and the plots atomically.

Accuracies are stored as fractions; the report prints percentages and differences in
percentage points ("points").
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

from epmq.atomic import write_bytes, write_json, write_text
from epmq.errors import EpmqError
from epmq.eval.gains import gain_lines, gap_lines, sweep_lines, task_weight_lines
from epmq.eval.markdown import bits_label, param_labels, pct, table
from epmq.eval.plots import (
    PLOT_FILES,
    Plot,
    build_plots,
    quant_label,
    quantizers,
)
from epmq.eval.results import Results, Row, average, normalized

GAP_THRESHOLD = 0.5
"""Differences below this many percentage points are reported as no gap / no gain."""

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"


def describe(row: Row) -> str:
    """A short description of how the row's model was made."""
    if row.kind == "pretrained":
        return "pretrained model, " + (
            "linear probes" if "probe" in row.name else "the experts' heads"
        )
    if row.kind == "expert":
        return "each task's own expert"
    parts = {"merged": ["full precision"], "target": ["E-PMQ target W*, unrounded"]}.get(
        row.kind, [f"{quant_label(row.quantizer)} {bits_label(row.bits or 0, None)}"]
    )
    if row.kind != "quantized" and row.bits is not None:
        parts.append(f"calibrated at {row.bits}-bit")
    if row.group_size is not None:
        parts.append(f"g{row.group_size}")
    parts += param_labels(row.quantizer, row.params)
    if row.x_source is not None:
        parts.append(f"X={row.x_source}")
    if row.task_weights is not None and row.task_weights.setting != "uniform":
        parts.append(f"{row.task_weights.setting} task weights")
    if row.study is not None:
        parts.append(f"{row.study.replace('_', '-')} study")
    return ", ".join(parts)


def ordered_rows(results: Results) -> list[Row]:
    """Pretrained, experts, then per merge: full precision, targets, quantized rows."""
    rows = results.find(kind="pretrained") + results.find(kind="expert")
    order = {name: i for i, name in enumerate(quantizers(results))}
    for merge in results.merges():
        rows += results.find(kind="merged", merge=merge) + results.find(kind="target", merge=merge)
        quantized = results.find(kind="quantized", merge=merge)
        rows += sorted(
            quantized,
            key=lambda r: (-(r.bits or 0), r.group_size or 0, order.get(r.quantizer or "", 0)),
        )
    return rows


def render_table(results: Results) -> list[str]:
    """The accuracy table: one row per model, tasks, average and normalised average."""
    expert = results.expert_row()
    body = []
    for row in ordered_rows(results):
        norm = "–"
        if expert is not None:
            with contextlib.suppress(EpmqError):
                norm = pct(normalized(row, expert).mean)
        cells = [row.name, describe(row)] + [pct(row.accuracy[t]) for t in results.tasks]
        body.append([*cells, pct(average(row)), norm])
    header = ["model", "setting", *results.tasks, "average", "normalised"]
    lines = table(header, body)
    lines.append("")
    lines.append(
        "Accuracy in %. *normalised* = mean over tasks of accuracy / expert accuracy (in %)."
        if expert is not None
        else "No expert row: the normalised column cannot be computed."
    )
    return lines


def _export_lines(results: Results) -> list[str]:
    """The exported checkpoints (``settings["exports"]``): folder and size against float16."""
    exports = results.settings.get("exports") or []
    if not exports:
        return []
    body = [
        [
            e["variant"],
            e["format"],
            f"`{e['folder']}`",
            f"{e['weights_bytes'] / 2**20:.2f} MiB",
            f"{e['weights_bytes'] / e['float16_bytes']:.3f}" if e["float16_bytes"] else "–",
        ]
        for e in exports
    ]
    header = ["model", "format", "folder", "weights on disk", "vs float16"]
    return ["## Exported checkpoints", "", *table(header, body), ""]


def _settings_lines(results: Results) -> list[str]:
    v, m = results.versions, results.machine
    lines = ["## Settings", "", f"- suite: {results.suite}", f"- tasks: {', '.join(results.tasks)}"]
    lines += [f"- seed: {results.seed}", f"- created: {results.created.isoformat()}"]
    lines.append(
        f"- versions: epmq {v.epmq}, torch {v.torch or '–'}, transformers"
        f" {v.transformers or '–'}, Python {v.python}"
    )
    lines.append(f"- machine: {m.cpu_count or '?'} CPUs, {m.platform}")
    lines += ["", "```json", json.dumps(results.settings, indent=2, sort_keys=True), "```", ""]
    if results.timings:
        lines += ["### Timings", ""]
        lines += table(["step", "seconds"], [[k, f"{s:.2f}"] for k, s in results.timings.items()])
    return lines


def render_markdown(
    results: Results,
    *,
    plots: Sequence[Plot] | None = None,
    gap_threshold: float = GAP_THRESHOLD,
) -> str:
    """The full Markdown report; ``plots`` (from :func:`build_plots`) adds a plots section."""
    lines = [f"# {results.suite}: post-merge quantization results", ""]
    dtype = results.settings.get("config", {}).get("evaluation", {}).get("dtype", "float32")
    if dtype != "float32":
        lines += [f"Evaluated with {dtype} forwards (autocast); calibration in float32.", ""]
    lines += [*render_table(results), ""]
    lines += [*gap_lines(results, gap_threshold), ""]
    lines += [*gain_lines(results, gap_threshold), ""]
    lines += [*sweep_lines(results), ""]
    lines += task_weight_lines(results)
    if plots is not None:
        lines += ["## Plots", ""]
        for plot in plots:
            if plot.png is not None:
                lines += [f"![{plot.title}]({plot.filename})", ""]
            else:
                lines += [f"- {plot.title}: skipped, {plot.skipped}.", ""]
    lines += _export_lines(results)
    lines += _settings_lines(results)
    text = "\n".join(lines).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


def write_report(results: Results, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``report.md``, ``results.json`` and the PNG plots into ``out_dir``.

    Every file is written atomically. Without ``force`` nothing is written when any of these
    files already exists; with ``force`` they are replaced, and a plot file left from an
    earlier run whose plot is now skipped is removed. Returns the path of ``report.md``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EpmqError(f"output {out} exists and is not a folder")
    if not force:
        existing = [n for n in (REPORT_FILE, RESULTS_FILE, *PLOT_FILES) if (out / n).exists()]
        if existing:
            raise EpmqError(
                f"output {out / existing[0]} already exists; pass --force to overwrite it"
            )
    plots = build_plots(results)
    write_json(out / RESULTS_FILE, results.model_dump(mode="json"), force=force)
    for plot in plots:
        if plot.png is not None:
            write_bytes(out / plot.filename, plot.png, force=force)
        else:
            (out / plot.filename).unlink(missing_ok=True)
    return write_text(out / REPORT_FILE, render_markdown(results, plots=plots), force=force)


__all__ = [
    "GAP_THRESHOLD",
    "REPORT_FILE",
    "RESULTS_FILE",
    "describe",
    "ordered_rows",
    "render_markdown",
    "render_table",
    "write_report",
]
