"""The report's analysis sections: the gaps (experts → merge → rounding), where a guided
solver's gain over its baseline comes from (E-PMQ over GPTQ: a better target or less rounding
loss), and the α sweep. Which solver is compared with which is read from the registry
(:func:`epmq.eval.plots.comparison`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from epmq.eval.markdown import bits_label, param_labels, pct, pts, table
from epmq.eval.plots import Comparison, comparison, quant_label, quantizers
from epmq.eval.results import ALPHA_SWEEP, Results, Row, SweepPoint, average
from epmq.quant.solvers import get_solver, list_solvers


def recovery_lines(results: Results) -> list[str]:
    """Per merge and bit setting, every quantizer's primary row and the share of the merging
    loss it recovers: ``(row − merge) / (experts − merge)`` (0 %: the full-precision merge's
    level, 100 %: the experts'; negative: below the merge)."""
    expert = results.expert_row()
    names = quantizers(results)
    lines = ["### Experts → merge → low bit: the share of the merging loss recovered", ""]
    if expert is None or not names:
        return [*lines, "Needs the experts' row and quantized rows; not measured.", ""]
    body = []
    for merge in results.merges():
        full = results.find(kind="merged", merge=merge)
        if not full:
            continue
        x, m = average(expert), average(full[0])
        for bits, group in results.bit_settings(merge):
            cells = [merge, bits_label(bits, group), pct(x), pct(m)]
            for name in names:
                row = results.quantized(merge, name, bits, group)
                if row is None:
                    cells.append("–")
                elif x - m <= 0:
                    cells.append(pct(average(row)))
                else:
                    share = 100 * (average(row) - m) / (x - m)
                    cells.append(f"{pct(average(row))} ({share:+.0f} %)")
            body.append(cells)
    if not body:
        return [*lines, "Needs a full-precision row per merge; not measured.", ""]
    header = ["merge", "setting", "experts", "merge", *(quant_label(n) for n in names)]
    lines += table(header, body)
    lines += [
        "",
        "Average accuracy in %; in brackets the share of the points lost by merging that the"
        " quantized model wins back (0 %: the full-precision merge, 100 %: the experts).",
        "",
    ]
    return lines


def gap_lines(results: Results, threshold: float) -> list[str]:
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
        text = f"- {merge}: experts {pct(average(expert))} → merge {pct(average(full[0]))}: "
        if gap < threshold:
            text += f"this setting shows no merging gap ({pts(-gap)} points)."
        else:
            text += f"{gap:.1f} points lost by merging."
        lines.append(text)
    lines += ["", *recovery_lines(results)]
    pair = comparison(results)
    guided_label, base_label = pair.labels
    lines += ["", f"### Merge → {base_label} (points lost by rounding) and {guided_label}", ""]
    for merge in merges:
        full = results.find(kind="merged", merge=merge)
        for bits, group in results.bit_settings(merge):
            gptq = results.quantized(merge, pair.baseline, bits, group)
            epmq = results.quantized(merge, pair.guided, bits, group)
            where = f"- {merge}, {bits_label(bits, group)}: "
            missing = [n for n, r in (("full-precision", full), (base_label, gptq)) if not r]
            if missing:
                lines.append(where + f"no {' or '.join(missing)} row; the gap is not measured.")
                continue
            m, g = average(full[0]), average(gptq)
            gap = 100 * (m - g)
            text = where + f"merge {pct(m)} → {base_label} {pct(g)}: "
            if gap < threshold:
                text += f"this setting shows no rounding gap ({pts(-gap)} points)."
            else:
                text += f"{gap:.1f} points lost by rounding."
            if epmq is None:
                text += f" No {guided_label} row."
            else:
                e = average(epmq)
                text += f" {guided_label} ({epmq.name}) reaches {pct(e)}, {pts(100 * (e - g))}"
                text += f" vs {base_label}"
                if gap >= threshold:
                    text += f", recovering {100 * (e - g) / (m - g):.0f}% of the gap"
                over = 100 * (e - m)
                if over >= threshold:
                    text += f"; it beats the full-precision merge by {over:.1f} points"
                text += "."
            lines.append(text)
    return lines


def attribute(
    merge: Row,
    target: Row | None,
    gptq: Row,
    epmq: Row,
    threshold: float,
    labels: tuple[str, str] = ("E-PMQ", "GPTQ"),
) -> str:
    """One rule-based sentence: is E-PMQ's gain over GPTQ a better merge or better rounding?

    With m, t, g, e the averages of the full-precision merge, the unrounded target W*, GPTQ
    and E-PMQ, the gain splits exactly as ``e − g = (t − m) + ((m − g) − (t − e))``: how much
    W* beats the merge, plus how much less E-PMQ loses to rounding than GPTQ. The larger share
    names the source ("better merge" or "better rounding").
    """
    m, g, e = (100 * average(r) for r in (merge, gptq, epmq))
    guided, base = labels
    gain = e - g
    if abs(gain) < threshold:
        within = f"within {threshold} points ({pts(gain)})"
        return f"{guided} and {base} are {within}: no gain to attribute."
    if gain < 0:
        return f"{guided} is {-gain:.1f} points below {base}: no gain to attribute."
    if target is None:
        gains = f"{guided} gains {pts(gain)} over {base}"
        return f"{gains}; without the unrounded target it is not split."
    t = 100 * average(target)
    from_merge = t - m
    from_rounding = gain - from_merge
    verdict = "better merge" if from_merge >= from_rounding else "better rounding"
    return (
        f"verdict: {verdict}. Of {guided}'s {pts(gain)} points over {base}, {pts(from_merge)}"
        f" come from the target W* ({t:.1f}) beating the merge ({m:.1f}) and"
        f" {pts(from_rounding)} from losing less to rounding ({guided} loses {t - e:.1f} from"
        f" W*, {base} {m - g:.1f} from the merge)."
    )


def _variant_key(row: Row) -> tuple[Any, ...]:
    return (row.quantizer, row.x_source or "quantized", tuple(sorted(row.params.items())))


def _variant_label(key: tuple[Any, ...]) -> str:
    quantizer, x_source, params = key
    labels = param_labels(quantizer, dict(params))
    return ", ".join([quant_label(quantizer), f"X={x_source}", *labels])


def _pick_target(
    results: Results, merge: str, setting: tuple[int, int | None], like: Row
) -> Row | None:
    """The target row for a bit setting, preferring the α and X source of ``like``."""
    bits, group = setting
    targets = results.find(kind="target", merge=merge)
    targets = [t for t in targets if t.bits in (None, bits) and t.group_size in (None, group)]
    targets.sort(
        key=lambda t: (t.bits is None, t.params != like.params, t.x_source != like.x_source)
    )
    return targets[0] if targets else None


def _merge_gain_lines(
    results: Results, merge: str, threshold: float, pair: Comparison
) -> list[str]:
    guided_label, base_label = pair.labels
    settings = [
        s
        for s in results.bit_settings(merge)
        if results.quantized(merge, pair.guided, *s, primary=False) is not None
    ]
    if not settings:
        return []
    full = results.find(kind="merged", merge=merge)
    epmq_rows = results.find(kind="quantized", merge=merge, quantizer=pair.guided)
    primaries = {s: results.quantized(merge, pair.guided, *s) or epmq_rows[0] for s in settings}

    def cells(pick: Callable[[tuple[int, int | None]], Row | None]) -> list[str]:
        return [pct(average(r)) if (r := pick(s)) is not None else "–" for s in settings]

    def variant(key: tuple[Any, ...], s: tuple[int, int | None]) -> Row | None:
        rows = results.find(
            kind="quantized", merge=merge, quantizer=pair.guided, bits=s[0], group_size=s[1]
        )
        return next((r for r in rows if _variant_key(r) == key), None)

    body = [
        ["full-precision merge", *cells(lambda s: full[0] if full else None)],
        ["target W* (unrounded)", *cells(lambda s: _pick_target(results, merge, s, primaries[s]))],
        [base_label, *cells(lambda s: results.quantized(merge, pair.baseline, *s))],
    ]
    for key in dict.fromkeys(_variant_key(r) for r in epmq_rows):
        body.append([_variant_label(key), *cells(partial(variant, key))])
    lines = ["", f"### {merge}", ""]
    lines += table(["variant", *(bits_label(*s) for s in settings)], body)
    lines.append("")
    for s in settings:
        gptq, epmq = (
            results.quantized(merge, pair.baseline, *s),
            results.quantized(merge, pair.guided, *s),
        )
        if not full or gptq is None or epmq is None:
            sentence = (
                f"needs a full-precision, a {base_label} and a primary {guided_label} row;"
                " not attributed."
            )
        else:
            target = _pick_target(results, merge, s, epmq)
            sentence = attribute(full[0], target, gptq, epmq, threshold, pair.labels)
        lines.append(f"- {bits_label(*s)}: {sentence}")
    return lines


def gain_lines(results: Results, threshold: float) -> list[str]:
    lines = ["## Where the gain comes from", ""]
    lines.append(
        "Per merge: the full-precision merge, E-PMQ's unrounded target W*, GPTQ, and E-PMQ"
        " (each X source and the merged-target ablation) at each bit width. The verdicts are"
        " automatic and rule-based: E-PMQ's gain over GPTQ splits exactly into (W* − merge)"
        " plus (GPTQ's rounding loss from the merge − E-PMQ's rounding loss from W*); the"
        " larger share names the source, and gains under the threshold are not attributed."
    )
    pair = comparison(results)
    sections = [_merge_gain_lines(results, m, threshold, pair) for m in results.merges()]
    body = [line for section in sections for line in section]
    return lines + (body or ["", f"No {pair.labels[0]} rows: nothing to attribute."])


def sweep_lines(results: Results) -> list[str]:
    lines = ["## α sweep", ""]
    points = results.sweeps.get(ALPHA_SWEEP, [])
    if not points:
        return [*lines, f"No {ALPHA_SWEEP!r} sweep in these results."]
    groups: dict[tuple[Any, ...], list[SweepPoint]] = {}
    for p in points:
        groups.setdefault((p.merge, p.quantizer, p.bits, p.group_size, p.x_source), []).append(p)
    for (merge, quantizer, bits, group, x_source), group_points in groups.items():
        title = f"{merge or '?'}, {quant_label(quantizer)}"
        title += f", {bits_label(bits, group)}" if bits is not None else ""
        title += f", X={x_source}" if x_source else ""
        alphas = sorted({p.params["alpha"] for p in group_points if "alpha" in p.params})
        body = []
        for alpha in alphas:
            row = [f"{alpha:g}"]
            for target in ("expert", "merged"):
                hit = [
                    p
                    for p in group_points
                    if p.params.get("alpha") == alpha and p.params.get("target", "expert") == target
                ]
                row.append(pct(hit[0].average) if hit else "–")
            body.append(row)
        lines += [f"### {title}", ""]
        lines += table(["α", "expert targets", "merged targets"], body)
        baseline = get_solver(quantizer).baseline if quantizer in list_solvers() else None
        found = (
            results.quantized(merge, baseline, bits, group) if baseline and merge and bits else None
        )
        if found is not None:
            lines += ["", f"{quant_label(baseline)} at this setting: {pct(average(found))}."]
        lines.append("")
    return lines


TASK_WEIGHTS_STUDY = "task_weights"
"""The study comparing task weightings (uniform vs auto); experiment/plan.py plans it."""


def _weights_label(row: Row) -> str:
    return "uniform" if row.task_weights is None else row.task_weights.setting


def task_weight_lines(results: Results) -> list[str]:
    """The task-weights study: per study row and the row it varies (same merge, quantizer,
    grid, X-source and parameters), the worst task's accuracy and the average under each
    weighting, and the weights ``auto`` chose. Empty when the results hold no such study."""
    studied = [r for r in results.rows if r.study == TASK_WEIGHTS_STUDY]
    if not studied:
        return []
    body = []
    for row in studied:
        twins = results.find(
            kind="quantized", merge=row.merge, bits=row.bits, group_size=row.group_size
        )
        base = next(
            (r for r in twins if r.is_primary and _variant_key(r) == _variant_key(row)), None
        )
        pair = sorted([r for r in (base, row) if r is not None], key=_weights_label, reverse=True)
        for r in pair:  # uniform first, then auto / given
            worst = min(r.accuracy, key=lambda t: r.accuracy[t])
            chosen = r.task_weights.weights if r.task_weights is not None else {}
            body.append(
                [
                    r.merge or "?",
                    bits_label(r.bits or 0, r.group_size),
                    _variant_label(_variant_key(r)),
                    _weights_label(r),
                    f"{pct(r.accuracy[worst])} ({worst})",
                    pct(average(r)),
                    ", ".join(f"{t} {w:.2f}" for t, w in chosen.items()) or "1 each",
                ]
            )
        if len(pair) == 2:
            low = [min(r.accuracy.values()) for r in pair]
            mean = [average(r) for r in pair]
            body.append(
                ["", "", f"{_weights_label(pair[1])} − {_weights_label(pair[0])}", "",
                 pts(100 * (low[1] - low[0])), pts(100 * (mean[1] - mean[0])), ""]
            )  # fmt: skip
    header = ["merge", "setting", "variant", "weights", "worst task", "average", "w_i"]
    return [
        "## Task weights: does `auto` lift the worst task?",
        "",
        "Each studied row beside the same model calibrated with the other weighting"
        " (`quantization.task_weights`); *worst task*: the lowest per-task accuracy in %,"
        " the last line of a pair its change in points.",
        "",
        *table(header, body),
        "",
    ]
