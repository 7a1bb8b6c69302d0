"""The page's comparisons section: every method-minus-baseline difference that has a 95%
interval, with a small bar per row (one horizontal scale per metric), and the rows without an
interval counted by reason."""
from __future__ import annotations

import pandas as pd

from prunebench.report.differences import EVAL_ONLY
from prunebench.report.format import EVAL_NOISE_ONLY, format_sparsity_label, method_display_name, model_display_name
from prunebench.report.page.markup import escape, finite_number, missing, num, sparsity_sort, table, td, truth

NO_INTERVALS = "no intervals available"
# The columns the section reads; a frame without some of them (a hand-made one) gets them empty.
SECTION_COLUMNS = ["model", "sparsity", "method", "baseline", "metric", "diff", "lo", "hi",
                   "significant", "n_seeds", "baseline_n_seeds", "noise"]


def _interval_svg(lo: float, hi: float, diff: float, left: float, right: float, significant: bool) -> str:
    width, height, pad = 160, 14, 4
    span = (right - left) or 1.0

    def x(value: float) -> float:
        return pad + (value - left) / span * (width - 2 * pad)

    color = "#c0392b" if significant else "#7f8c8d"
    return (f'<svg class="ci" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="interval">'
            f'<line x1="{x(0):.1f}" y1="0" x2="{x(0):.1f}" y2="{height}" stroke="#999" stroke-dasharray="2,2"/>'
            f'<line x1="{x(lo):.1f}" y1="{height / 2}" x2="{x(hi):.1f}" y2="{height / 2}" stroke="{color}" stroke-width="2"/>'
            f'<circle cx="{x(diff):.1f}" cy="{height / 2}" r="3" fill="{color}"/></svg>')


def _significance_text(label: str, row) -> str:
    """"yes (3 vs 3)": the verdict and the seeds behind the method and the baseline, with the
    evaluation-only marker when a seed-dependent side has one seed."""
    a, b = row.n_seeds, row.baseline_n_seeds
    text = label if missing(a) or missing(b) else f"{label} ({int(a)} vs {int(b)})"
    return text + (EVAL_NOISE_ONLY.symbol if row.noise == EVAL_ONLY else "")


def _noise_text(row) -> str:
    return "" if missing(row.noise) else f"the interval covers: {row.noise}"


def comparisons_section(comparisons: pd.DataFrame | None) -> str:
    title = '<h2 id="intervals">Comparisons: 95% intervals</h2>'
    if comparisons is None or not isinstance(comparisons, pd.DataFrame) or comparisons.empty:
        return title + f'<p class="empty" id="no-intervals">{NO_INTERVALS}</p>'
    frame = comparisons.copy()
    for column in SECTION_COLUMNS + ["note", "unit"]:
        if column not in frame.columns:
            frame[column] = None
    bounded = frame["lo"].map(finite_number).notna() & frame["hi"].map(finite_number).notna()
    # Rows without an interval would fill the table with dashes: count them by reason instead.
    reasons = frame.loc[~bounded, "note"].map(lambda n: "no interval" if missing(n) or not n else str(n))
    without = ""
    if len(reasons):
        counts = ", ".join(f"{escape(reason)} ({count})" for reason, count in reasons.value_counts().items())
        without = f'<p class="caption" id="intervals-missing">{len(reasons)} comparisons without an interval: {counts}.</p>'
    frame = frame[bounded]
    if frame.empty:
        return title + f'<p class="empty" id="no-intervals">{NO_INTERVALS}</p>' + without
    # One horizontal scale per metric: perplexity and accuracy differences do not share units.
    scales = {}
    for metric, group in frame.groupby("metric", dropna=False, sort=False):
        values = [v for v in map(finite_number, pd.concat([group["lo"], group["hi"], group["diff"]]))
                  if v is not None]
        scales[metric] = (min([0.0] + values), max([0.0] + values))
    headers = [("Model", "text"), ("Sparsity", "num"), ("Method", "text"), ("Baseline", "text"),
               ("Metric", "text"), ("Diff", "num"), ("95% interval", "num"), ("vs 0", "num"),
               ("Significant (seeds)", "text")]
    rows = []
    for row in frame.itertuples(index=False):
        significant = truth(row.significant)
        lo, hi, diff = finite_number(row.lo), finite_number(row.hi), finite_number(row.diff)
        plot = ""
        if diff is not None:
            left, right = scales.get(row.metric, (min(lo, 0.0), max(hi, 0.0)))
            plot = _interval_svg(lo, hi, diff, left, right, bool(significant))
        label = "-" if significant is None else ("yes" if significant else "no")
        metric = str(row.metric) + (f" ({row.unit})" if isinstance(row.unit, str) and row.unit else "")
        rows.append(
            f'<tr class="ci-row{" sig" if significant else ""}">'
            f"<td>{escape(model_display_name(str(row.model)))}</td>"
            f"{td(escape(format_sparsity_label(str(row.sparsity))), sort=sparsity_sort(str(row.sparsity)))}"
            f"<td>{escape(method_display_name(str(row.method)))}</td><td>{escape(method_display_name(str(row.baseline)))}</td>"
            f"<td>{escape(metric)}</td>{td(escape(num(diff)), sort=diff, css='r')}"
            f"{td(escape(f'[{num(lo)}, {num(hi)}]'), sort=lo, css='r')}{td(plot, sort=diff)}"
            f"{td(escape(_significance_text(label, row)), sort=label, title=_noise_text(row))}</tr>")
    note = ('<p class="caption">Method minus baseline with its 95% interval (two-level bootstrap: the seeds of '
            'each side, then the shared windows / items); in the bar the dot is the '
            'difference and the dashed line zero (one scale per metric), red where the interval excludes '
            'zero. "evaluation noise only": a side that depends on the seed has one seed, so no verdict '
            'rests on that interval.</p>')
    return title + note + table(headers, rows, table_id="intervals-table", sortable=True) + without
