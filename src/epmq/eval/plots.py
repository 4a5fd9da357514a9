"""PNG plots of one experiment's results (matplotlib, Agg backend, no pyplot state).

Each plot is a function from :class:`~epmq.eval.results.Results` to PNG bytes, or ``None``
when the results lack its data; :func:`build_plots` runs them all and records why a plot was
skipped so the report can say so.

- :func:`accuracy_by_bits`: average accuracy against bits, one line per merge × quantizer
  (× group size), full-precision merges and experts as horizontal references.
- :func:`per_task_bars`: per-task accuracy at one bit width: experts, merge, GPTQ, E-PMQ.
- :func:`alpha_sweep`: average accuracy against the anchor strength α (symlog x-axis, α = 0
  included), expert-target and merged-target curves, GPTQ as a horizontal reference.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from itertools import cycle
from typing import TYPE_CHECKING, Any, NamedTuple

from epmq.eval.results import ALPHA_SWEEP, Results, Row, SweepPoint, average
from epmq.quant.solvers import get_solver, list_solvers, solver_label, solver_rank

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_STYLES = [(":", "s"), ("--", "o"), ("-", "^"), ("-.", "D"), (":", "v"), ("--", "P")]


def quantizers(results: Results) -> list[str]:
    """The quantizers of ``results`` in the config's order (then the others in the order
    they were registered: baselines first)."""
    config = results.settings.get("config", {})
    listed = list(config.get("quantization", {}).get("methods", [])) if config else []
    seen = {r.quantizer for r in results.rows if r.quantizer is not None}
    rest = sorted(seen - set(listed), key=lambda q: (solver_rank(q), q))
    return [q for q in listed if q in seen] + rest


def quant_label(quantizer: str | None) -> str:
    """The display name a solver declares (``E-PMQ``); an unknown name as it is."""
    return "?" if quantizer is None else solver_label(quantizer)


class Comparison(NamedTuple):
    """A solver and the baseline it declares it improves on (E-PMQ over GPTQ)."""

    guided: str
    baseline: str

    @property
    def labels(self) -> tuple[str, str]:
        return solver_label(self.guided), solver_label(self.baseline)


def comparison(results: Results) -> Comparison:
    """The comparison the report and plots are about: the first quantizer of ``results``
    that declares a baseline (else the first registered one, for the wording)."""
    declared = [
        Comparison(name, baseline)
        for name in list_solvers()
        if (baseline := get_solver(name).baseline) is not None
    ]
    present = quantizers(results)
    found = [c for c in declared if c.guided in present]
    return (found or declared)[0]


@dataclass(frozen=True)
class Plot:
    """One plot of the report: its file name, title, and PNG bytes or why it was skipped."""

    filename: str
    title: str
    png: bytes | None
    skipped: str | None = None


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _group_label(group_size: int | None) -> str:
    return "per-channel" if group_size is None else f"g{group_size}"


def _finish(ax: Axes, title: str, xlabel: str, *, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%)")
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)


def accuracy_by_bits(results: Results) -> bytes | None:
    """Average accuracy by bits for each merge × quantizer, one panel per group size (shared
    y axis); ``None`` without quantized rows."""
    quantized = [r for r in results.find(kind="quantized") if r.is_primary]
    if not quantized:
        return None
    merges = results.merges()
    groups = sorted({r.group_size for r in quantized}, key=lambda g: g or 0)
    fig = _figure(width=2.0 + 5.0 * len(groups))
    first: Axes | None = None
    for panel, group in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), panel + 1, sharey=first)
        first = first or ax
        for merge, color in zip(merges, _colors(len(merges)), strict=True):
            for quantizer, (style, marker) in zip(quantizers(results), cycle(_STYLES)):
                by_bits: dict[int, Row] = {}
                for r in quantized:
                    if r.merge == merge and r.quantizer == quantizer and r.group_size == group:
                        by_bits.setdefault(r.bits or 0, r)
                if by_bits:
                    bits = sorted(by_bits)
                    ys = [100 * average(by_bits[b]) for b in bits]
                    label = f"{merge} {quant_label(quantizer)}"
                    ax.plot(bits, ys, linestyle=style, marker=marker, color=color, label=label)
            for row in results.find(kind="merged", merge=merge)[:1]:
                ax.axhline(100 * average(row), color=color, linestyle="-.", linewidth=1, alpha=0.6)
                ax.plot([], [], color=color, linestyle="-.", label=f"{merge} full precision")
        expert = results.expert_row()
        if expert is not None:
            ax.axhline(100 * average(expert), color="black", linewidth=1.2, label="experts")
        ax.set_xticks(sorted({r.bits or 0 for r in quantized}))
        title = f"{results.suite}: average accuracy by bit width"
        if len(groups) > 1:
            title = f"{_group_label(group)}" if panel else f"{title}, {_group_label(group)}"
        _finish(ax, title, "bits", legend=panel == len(groups) - 1)
    return _png(fig)


def _bars_setting(results: Results) -> tuple[str, int, int | None] | None:
    """The merge and lowest bit setting that has both a GPTQ and an E-PMQ row."""
    pair = comparison(results)
    for bits, group in reversed(results.bit_settings()):
        for merge in results.merges():
            baseline = results.quantized(merge, pair.baseline, bits, group)
            guided = results.quantized(merge, pair.guided, bits, group)
            if baseline is not None and guided is not None:
                return merge, bits, group
    return None


def per_task_bars(
    results: Results,
    merge: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
) -> bytes | None:
    """Per-task accuracy of experts, merge, GPTQ and E-PMQ at one bit width.

    Without ``merge``/``bits`` the lowest bit setting with both GPTQ and E-PMQ rows is used.
    ``None`` when the chosen setting lacks GPTQ and E-PMQ rows.
    """
    if merge is None or bits is None:
        chosen = _bars_setting(results)
        if chosen is None:
            return None
        merge, bits, group_size = chosen
    bars: list[tuple[str, Row]] = []
    expert = results.expert_row()
    if expert is not None:
        bars.append(("experts", expert))
    bars += [(f"{merge} full precision", r) for r in results.find(kind="merged", merge=merge)[:1]]
    for quantizer in (comparison(results).baseline, comparison(results).guided):
        row = results.quantized(merge, quantizer, bits, group_size)
        if row is not None:
            bars.append((f"{quant_label(quantizer)} {bits}-bit", row))
    if not any(r.kind == "quantized" for _, r in bars):
        return None
    tasks = results.tasks
    fig = _figure(width=max(6.0, 1.1 * len(tasks) + 3.0))
    ax = fig.add_subplot()
    width = 0.8 / len(bars)
    for i, ((label, row), color) in enumerate(zip(bars, _colors(len(bars)), strict=True)):
        xs = [t + (i - (len(bars) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [100 * row.accuracy[t] for t in tasks], width, label=label, color=color)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30 if len(tasks) > 4 else 0, ha="right")
    title = f"{results.suite}: per-task accuracy, {merge}, {bits}-bit {_group_label(group_size)}"
    _finish(ax, title, "task")
    ax.set_ylabel("accuracy (%)")
    return _png(fig)


def alpha_sweep(results: Results) -> bytes | None:
    """Average accuracy against α; ``None`` when there is no α sweep with α values."""
    points = [p for p in results.sweeps.get(ALPHA_SWEEP, []) if "alpha" in p.params]
    if not points:
        return None
    curves: dict[tuple[Any, ...], list[SweepPoint]] = {}
    for p in points:
        curves.setdefault((p.merge, p.bits, p.group_size, p.x_source), []).append(p)
    fig = _figure()
    ax = fig.add_subplot()
    for key, color in zip(curves, _colors(len(curves)), strict=True):
        merge, bits, group, x_source = key
        name = f"{merge or 'merge'} {bits or '?'}-bit"
        if group is not None:
            name += f" g{group}"
        if x_source is not None:
            name += f" X={x_source}"
        for target, style, marker in (("expert", "-", "o"), ("merged", "--", "s")):
            pts = sorted(
                (p for p in curves[key] if p.params.get("target", "expert") == target),
                key=lambda p: float(p.params["alpha"]),
            )
            if pts:
                ax.plot(
                    [float(p.params["alpha"]) for p in pts],
                    [100 * p.average for p in pts],
                    linestyle=style,
                    marker=marker,
                    color=color,
                    label=f"{name}, {target} targets",
                )
        if merge is not None and bits is not None:
            pair = comparison(results)
            baseline = results.quantized(merge, pair.baseline, bits, group)
            if baseline is not None:
                ax.axhline(100 * average(baseline), color=color, linestyle=":", linewidth=1)
                ax.plot([], [], color=color, linestyle=":", label=f"{name}, {pair.labels[1]}")
    alphas = (float(p.params["alpha"]) for p in points)
    positive = sorted(a for a in alphas if a > 0)
    ax.set_xscale("symlog", linthresh=positive[0] if positive else 1e-3)
    _finish(ax, f"{results.suite}: anchor strength α sweep", "α (symlog scale, 0 included)")
    return _png(fig)


def build_plots(results: Results) -> list[Plot]:
    """Every plot of the report, each rendered or marked skipped with the reason."""
    specs = [
        (
            "accuracy_by_bits.png",
            "Average accuracy by bit width",
            accuracy_by_bits,
            "the results have no quantized rows",
        ),
        (
            "per_task.png",
            "Per-task accuracy at the lowest bit width",
            per_task_bars,
            "no bit width has both a GPTQ and an E-PMQ row for the same merge",
        ),
        (
            "alpha_sweep.png",
            "Anchor strength α sweep",
            alpha_sweep,
            f"the results have no {ALPHA_SWEEP!r} sweep with α values",
        ),
    ]
    plots = []
    for filename, title, render, reason in specs:
        png = render(results)
        plots.append(Plot(filename, title, png, None if png is not None else reason))
    return plots


PLOT_FILES = ("accuracy_by_bits.png", "per_task.png", "alpha_sweep.png")

__all__ = [
    "PLOT_FILES",
    "Plot",
    "accuracy_by_bits",
    "alpha_sweep",
    "build_plots",
    "per_task_bars",
]
