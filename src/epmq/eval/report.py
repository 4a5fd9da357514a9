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
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from epmq.atomic import write_bytes, write_json, write_text
from epmq.errors import EpmqError
from epmq.eval.plots import PLOT_FILES, Plot, build_plots, quant_label, quantizers
from epmq.eval.results import ALPHA_SWEEP, Results, Row, SweepPoint, average, normalized

GAP_THRESHOLD = 0.5
"""Differences below this many percentage points are reported as no gap / no gain."""

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def _pts(points: float) -> str:
    return f"{points:+.1f}"


def _bits_label(bits: int, group: int | None) -> str:
    return f"{bits}-bit" + ("" if group is None else f" g{group}")


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def describe(row: Row) -> str:
    """A short description of how the row's model was made."""
    if row.kind == "pretrained":
        return "pretrained model, " + (
            "linear probes" if "probe" in row.name else "the experts' heads"
        )
    if row.kind == "expert":
        return "each task's own expert"
    parts = {"merged": ["full precision"], "target": ["E-PMQ target W*, unrounded"]}.get(
        row.kind, [f"{quant_label(row.quantizer)} {_bits_label(row.bits or 0, None)}"]
    )
    if row.kind != "quantized" and row.bits is not None:
        parts.append(f"calibrated at {row.bits}-bit")
    if row.group_size is not None:
        parts.append(f"g{row.group_size}")
    if row.alpha is not None:
        parts.append(f"α={row.alpha:g}")
    if row.x_source is not None:
        parts.append(f"X={row.x_source}")
    if row.target == "merged":
        parts.append("merged targets (ablation)")
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
                norm = _pct(normalized(row, expert).mean)
        cells = [row.name, describe(row)] + [_pct(row.accuracy[t]) for t in results.tasks]
        body.append([*cells, _pct(average(row)), norm])
    header = ["model", "setting", *results.tasks, "average", "normalised"]
    lines = _table(header, body)
    lines.append("")
    lines.append(
        "Accuracy in %. *normalised* = mean over tasks of accuracy / expert accuracy (in %)."
        if expert is not None
        else "No expert row: the normalised column cannot be computed."
    )
    return lines


def _gap_lines(results: Results, threshold: float) -> list[str]:
    lines = ["## The gaps", "", f"Differences under {threshold} points count as no gap.", ""]
    lines += ["### Experts → merge (points lost by merging)", ""]
    expert = results.expert_row()
    merges = results.merges()
    for merge in merges:
        full = results.find(kind="merged", merge=merge)
        if expert is None or not full:
            lines.append(f"- {merge}: no expert or full-precision row; the gap is not measured.")
            continue
        gap = 100 * (average(expert) - average(full[0]))
        text = f"- {merge}: experts {_pct(average(expert))} → merge {_pct(average(full[0]))}: "
        if gap < threshold:
            text += f"this setting shows no merging gap ({_pts(-gap)} points)."
        else:
            text += f"{gap:.1f} points lost by merging."
        lines.append(text)
    lines += ["", "### Merge → GPTQ (points lost by rounding) and E-PMQ", ""]
    for merge in merges:
        full = results.find(kind="merged", merge=merge)
        for bits, group in results.bit_settings(merge):
            gptq = results.quantized(merge, "gptq", bits, group)
            epmq = results.quantized(merge, "epmq", bits, group)
            where = f"- {merge}, {_bits_label(bits, group)}: "
            if not full or gptq is None:
                lines.append(where + "no full-precision or GPTQ row; the gap is not measured.")
                continue
            m, g = average(full[0]), average(gptq)
            gap = 100 * (m - g)
            text = where + f"merge {_pct(m)} → GPTQ {_pct(g)}: "
            if gap < threshold:
                text += f"this setting shows no rounding gap ({_pts(-gap)} points)."
            else:
                text += f"{gap:.1f} points lost by rounding."
            if epmq is None:
                text += " No E-PMQ row."
            else:
                e = average(epmq)
                text += f" E-PMQ ({epmq.name}) reaches {_pct(e)}, {_pts(100 * (e - g))} vs GPTQ"
                if gap >= threshold:
                    text += f", recovering {100 * (e - g) / (m - g):.0f}% of the gap"
                over = 100 * (e - m)
                if over >= threshold:
                    text += f"; it beats the full-precision merge by {over:.1f} points"
                text += "."
            lines.append(text)
    return lines


def attribute(merge: Row, target: Row | None, gptq: Row, epmq: Row, threshold: float) -> str:
    """One rule-based sentence: is E-PMQ's gain over GPTQ a better merge or better rounding?

    With m, t, g, e the averages of the full-precision merge, the unrounded target W*, GPTQ
    and E-PMQ, the gain splits exactly as ``e − g = (t − m) + ((m − g) − (t − e))``: how much
    W* beats the merge, plus how much less E-PMQ loses to rounding than GPTQ. The larger share
    names the source ("better merge" or "better rounding").
    """
    m, g, e = (100 * average(r) for r in (merge, gptq, epmq))
    gain = e - g
    if abs(gain) < threshold:
        return f"E-PMQ and GPTQ are within {threshold} points ({_pts(gain)}): no gain to attribute."
    if gain < 0:
        return f"E-PMQ is {-gain:.1f} points below GPTQ: no gain to attribute."
    if target is None:
        return f"E-PMQ gains {_pts(gain)} over GPTQ; without the unrounded target it is not split."
    t = 100 * average(target)
    from_merge = t - m
    from_rounding = gain - from_merge
    verdict = "better merge" if from_merge >= from_rounding else "better rounding"
    return (
        f"verdict: {verdict}. Of E-PMQ's {_pts(gain)} points over GPTQ, {_pts(from_merge)} come"
        f" from the target W* ({t:.1f}) beating the merge ({m:.1f}) and {_pts(from_rounding)}"
        f" from losing less to rounding (E-PMQ loses {t - e:.1f} from W*, GPTQ {m - g:.1f} from"
        " the merge)."
    )


def _variant_key(row: Row) -> tuple[Any, ...]:
    return (row.x_source or "quantized", row.target or "expert", row.alpha)


def _variant_label(key: tuple[Any, ...]) -> str:
    x_source, target, alpha = key
    label = f"E-PMQ, X={x_source}"
    if alpha is not None:
        label += f", α={alpha:g}"
    return label + (", merged targets (ablation)" if target == "merged" else "")


def _pick_target(
    results: Results, merge: str, setting: tuple[int, int | None], like: Row
) -> Row | None:
    """The target row for a bit setting, preferring the α and X source of ``like``."""
    bits, group = setting
    targets = results.find(kind="target", merge=merge)
    targets = [t for t in targets if t.bits in (None, bits) and t.group_size in (None, group)]
    targets.sort(key=lambda t: (t.bits is None, t.alpha != like.alpha, t.x_source != like.x_source))
    return targets[0] if targets else None


def _merge_gain_lines(results: Results, merge: str, threshold: float) -> list[str]:
    settings = [
        s
        for s in results.bit_settings(merge)
        if results.quantized(merge, "epmq", *s, primary=False) is not None
    ]
    if not settings:
        return []
    full = results.find(kind="merged", merge=merge)
    epmq_rows = results.find(kind="quantized", merge=merge, quantizer="epmq")
    primaries = {s: results.quantized(merge, "epmq", *s) or epmq_rows[0] for s in settings}

    def cells(pick: Callable[[tuple[int, int | None]], Row | None]) -> list[str]:
        return [_pct(average(r)) if (r := pick(s)) is not None else "–" for s in settings]

    def variant(key: tuple[Any, ...], s: tuple[int, int | None]) -> Row | None:
        rows = results.find(
            kind="quantized", merge=merge, quantizer="epmq", bits=s[0], group_size=s[1]
        )
        return next((r for r in rows if _variant_key(r) == key), None)

    body = [
        ["full-precision merge", *cells(lambda s: full[0] if full else None)],
        ["target W* (unrounded)", *cells(lambda s: _pick_target(results, merge, s, primaries[s]))],
        ["GPTQ", *cells(lambda s: results.quantized(merge, "gptq", *s))],
    ]
    for key in dict.fromkeys(_variant_key(r) for r in epmq_rows):
        body.append([_variant_label(key), *cells(partial(variant, key))])
    lines = ["", f"### {merge}", ""]
    lines += _table(["variant", *(_bits_label(*s) for s in settings)], body)
    lines.append("")
    for s in settings:
        gptq, epmq = results.quantized(merge, "gptq", *s), results.quantized(merge, "epmq", *s)
        if not full or gptq is None or epmq is None:
            sentence = "needs a full-precision, a GPTQ and a primary E-PMQ row; not attributed."
        else:
            target = _pick_target(results, merge, s, epmq)
            sentence = attribute(full[0], target, gptq, epmq, threshold)
        lines.append(f"- {_bits_label(*s)}: {sentence}")
    return lines


def _gain_lines(results: Results, threshold: float) -> list[str]:
    lines = ["## Where the gain comes from", ""]
    lines.append(
        "Per merge: the full-precision merge, E-PMQ's unrounded target W*, GPTQ, and E-PMQ"
        " (each X source and the merged-target ablation) at each bit width. The verdicts are"
        " automatic and rule-based: E-PMQ's gain over GPTQ splits exactly into (W* − merge)"
        " plus (GPTQ's rounding loss from the merge − E-PMQ's rounding loss from W*); the"
        " larger share names the source, and gains under the threshold are not attributed."
    )
    sections = [_merge_gain_lines(results, merge, threshold) for merge in results.merges()]
    body = [line for section in sections for line in section]
    return lines + (body or ["", "No E-PMQ rows: nothing to attribute."])


def _sweep_lines(results: Results) -> list[str]:
    lines = ["## α sweep", ""]
    points = results.sweeps.get(ALPHA_SWEEP, [])
    if not points:
        return [*lines, f"No {ALPHA_SWEEP!r} sweep in these results."]
    groups: dict[tuple[Any, ...], list[SweepPoint]] = {}
    for p in points:
        groups.setdefault((p.merge, p.quantizer, p.bits, p.group_size, p.x_source), []).append(p)
    for (merge, quantizer, bits, group, x_source), pts in groups.items():
        title = f"{merge or '?'}, {quant_label(quantizer)}"
        title += f", {_bits_label(bits, group)}" if bits is not None else ""
        title += f", X={x_source}" if x_source else ""
        alphas = sorted({p.alpha for p in pts if p.alpha is not None})
        body = []
        for alpha in alphas:
            row = [f"{alpha:g}"]
            for target in ("expert", "merged"):
                hit = [p for p in pts if p.alpha == alpha and (p.target or "expert") == target]
                row.append(_pct(hit[0].average) if hit else "–")
            body.append(row)
        lines += [f"### {title}", ""]
        lines += _table(["α", "expert targets", "merged targets"], body)
        gptq = results.quantized(merge, "gptq", bits, group) if merge and bits else None
        if gptq is not None:
            lines += ["", f"GPTQ at this setting: {_pct(average(gptq))}."]
        lines.append("")
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
    return ["## Exported checkpoints", "", *_table(header, body), ""]


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
        lines += _table(["step", "seconds"], [[k, f"{s:.2f}"] for k, s in results.timings.items()])
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
    lines += [*_gap_lines(results, gap_threshold), ""]
    lines += [*_gain_lines(results, gap_threshold), ""]
    lines += [*_sweep_lines(results), ""]
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
    "attribute",
    "describe",
    "ordered_rows",
    "render_markdown",
    "render_table",
    "write_report",
]
