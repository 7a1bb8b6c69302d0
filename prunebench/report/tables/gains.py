"""The average-accuracy gain of each learned method over a baseline, per model and sparsity,
with its 95% paired-bootstrap interval; a summary per method; markdown and LaTeX renderings.

The default baseline is the one of the layout paper's headline claim (published/, its data
file); BEST_LAYERWISE compares with the best of the layer-wise methods present in each setting.
Which methods are learned or layer-wise comes from the registry: this file lists no method.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
from tabulate import tabulate

from prunebench import registry
from prunebench.report import uncertainty
from prunebench.report.differences import Difference, avg_acc_difference
from prunebench.report.format import (INTERVAL_MARKERS, Marker, format_number, format_sparsity_label, is_missing,
                                      latex_escape, method_display_name, method_order, model_display_name,
                                      model_order, signed, sparsity_label_order)
from prunebench.report.frame import cell_value, collapse_duplicate_cells, is_dense, ok_rows, resolve_tasks
from prunebench.report.paper import PERCENT, reference_paper

BEST_LAYERWISE = "best-layerwise"
ALL_SETTINGS = "all"
GAIN_COLUMNS = ["method", "model", "model_name", "sparsity_label", "pattern", "avg", "baseline",
                "baseline_avg", "gain", "basis", "gain_lo", "gain_hi", "significant", "interval_note"]


def methods_of_kind(kind: str) -> tuple:
    """The registered methods (no allocations) whose class declares `kind`."""
    return tuple(m["name"] for m in registry.describe() if m["kind"] == kind)


def learned_methods() -> tuple:
    return methods_of_kind("learned")


def layerwise_methods() -> tuple:
    return methods_of_kind("layer-wise")


def resolve_baseline(baseline: str | Sequence[str] | None) -> str | Sequence[str]:
    """The baseline asked for, else the one of the layout paper's headline claim."""
    return reference_paper().headline_baseline if baseline is None else baseline


def _baseline_methods(baseline: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(baseline, str):
        return layerwise_methods() if baseline == BEST_LAYERWISE else (baseline,)
    return tuple(baseline)


def baseline_name(baseline: str | Sequence[str] | None) -> str:
    baseline = resolve_baseline(baseline)
    if isinstance(baseline, str):
        return "best layer-wise baseline" if baseline == BEST_LAYERWISE else method_display_name(baseline)
    return "best of " + ", ".join(method_display_name(m) for m in baseline)


def _comparable_averages(learned: pd.Series, baseline: pd.Series, tasks: list[str],
                         prefer_published_avg: bool) -> tuple[float, float, str] | None:
    """Both rows' averages over the same footing (fractions), and what that footing is."""
    learned_published, baseline_published = (cell_value(learned, "published_avg"),
                                             cell_value(baseline, "published_avg"))
    both_published = learned_published is not None and baseline_published is not None
    if prefer_published_avg and both_published:
        return learned_published, baseline_published, "published Avg"
    common = [task for task in tasks if cell_value(learned, f"acc_{task}") is not None
              and cell_value(baseline, f"acc_{task}") is not None]
    if common:
        learned_mean = sum(cell_value(learned, f"acc_{t}") for t in common) / len(common)
        baseline_mean = sum(cell_value(baseline, f"acc_{t}") for t in common) / len(common)
        return learned_mean, baseline_mean, f"mean of {len(common)} tasks"
    if both_published:
        return learned_published, baseline_published, "published Avg"
    return None


def gain_table(df: pd.DataFrame, learned_methods: Sequence[str] | None = None,
               baseline: str | Sequence[str] | None = None, tasks: Sequence[str] | None = None,
               prefer_published_avg: bool = True) -> pd.DataFrame:
    """Average-accuracy gain of each learned method over a baseline, per model and sparsity.

    `baseline`: a method name (default: the baseline of the layout paper's headline comparison),
    BEST_LAYERWISE (the best of the layer-wise methods present in each setting) or a list of
    methods (their best).  `learned_methods`: the methods compared (default: every method of kind
    "learned"). Averages are compared on one footing: the published averages when both rows have
    one and `prefer_published_avg` (that is how the paper computed its headline), else the mean
    over the tasks both rows measured. Returns percent points: GAIN_COLUMNS, that is method, model,
    model_name, sparsity_label, pattern, avg, baseline, baseline_avg, gain, basis, and the gain's
    95% paired-bootstrap interval gain_lo, gain_hi (items resampled within each task, averaged
    over the tasks as the gain is), significant (None without an interval) and interval_note (why
    there is none).
    """
    frame = collapse_duplicate_cells(ok_rows(df))
    tasks = resolve_tasks(frame, tasks)
    candidates = _baseline_methods(resolve_baseline(baseline))
    compared = methods_of_kind("learned") if learned_methods is None else tuple(learned_methods)
    records = []
    for _, learned in frame[frame["method"].isin(compared)].iterrows():
        if is_dense(learned):
            continue
        same_setting = frame[(frame["model"] == learned["model"])
                             & (frame["pattern"] == learned["pattern"])
                             & (frame["sparsity_label"] == learned["sparsity_label"])
                             & (frame["method"].isin(candidates))]
        best = None
        for _, base in same_setting.iterrows():
            averages = _comparable_averages(learned, base, tasks, prefer_published_avg)
            if averages is not None and (best is None or averages[1] > best[1][1]):
                best = (base, averages)
        if best is None:
            continue
        base, (learned_avg, baseline_avg, basis) = best
        gain = (learned_avg - baseline_avg) * PERCENT
        difference = (avg_acc_difference(learned, base, tasks) if basis != "published Avg"
                      else Difference(gain, note="no interval (published averages)"))
        if difference is None:
            difference = Difference(gain, note=uncertainty.NO_ITEM_DATA)
        records.append({
            "method": learned["method"], "model": learned["model"],
            "model_name": model_display_name(learned["model"]),
            "sparsity_label": learned["sparsity_label"], "pattern": learned["pattern"],
            "avg": learned_avg * PERCENT, "baseline": base["method"],
            "baseline_avg": baseline_avg * PERCENT,
            "gain": gain, "basis": basis,
            "gain_lo": difference.lo, "gain_hi": difference.hi,
            "significant": difference.significant, "interval_note": difference.note,
        })
    gains = pd.DataFrame(records, columns=GAIN_COLUMNS)
    if gains.empty:
        return gains
    order = sorted(range(len(gains)), key=lambda i: (
        method_order(gains["method"].iat[i]), sparsity_label_order(gains["sparsity_label"].iat[i]),
        model_order(gains["model"].iat[i])))
    return gains.iloc[order].reset_index(drop=True)


def summarize_gains(gains: pd.DataFrame) -> pd.DataFrame:
    """Mean gain per learned method, per sparsity label and over all settings ("all")."""
    records = []
    for method in sorted(gains["method"].unique(), key=method_order):
        mine = gains[gains["method"] == method]
        for label in sorted(mine["sparsity_label"].unique(), key=sparsity_label_order):
            subset = mine[mine["sparsity_label"] == label]
            records.append({"method": method, "sparsity_label": label,
                            "n_settings": len(subset), "mean_gain": subset["gain"].mean()})
        records.append({"method": method, "sparsity_label": ALL_SETTINGS,
                        "n_settings": len(mine), "mean_gain": mine["gain"].mean()})
    return pd.DataFrame(records, columns=["method", "sparsity_label", "n_settings", "mean_gain"])


# ----------------------------------------------------------------------------- renderings

def _gain_difference(row) -> Difference:
    lo, hi = getattr(row, "gain_lo", None), getattr(row, "gain_hi", None)
    note = getattr(row, "interval_note", None)
    if is_missing(lo) or is_missing(hi):
        lo = hi = None
    return Difference(row.gain, lo, hi, note=None if is_missing(note) else note)


def _gain_interval(row, latex: bool = False) -> str:
    """The 95% interval of a gain, "[lo, hi]" with the not-significant mark, or the
    no-interval mark alone."""
    d = _gain_difference(row)
    marker = d.marker
    mark = "" if marker is None else (marker.latex if latex else marker.symbol)
    if d.lo is None:
        return mark
    return f"[{format_number(d.lo)}, {format_number(d.hi)}]{mark}"


def _gain_markers(gains: pd.DataFrame) -> list[Marker]:
    used = {_gain_difference(row).marker for row in gains.itertuples()}
    return [marker for marker in INTERVAL_MARKERS if marker in used]


def render_gains_latex(gains: pd.DataFrame, baseline: str | Sequence[str] | None = None) -> str:
    """The per-setting gains as a booktabs table, each with its 95% interval; not-significant
    gains (the interval contains zero) carry the ns mark."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(f'Average-accuracy gain over {baseline_name(baseline)} (points), with 95% paired-bootstrap intervals.')}}}",
             r"\begin{tabular}{lllrlrrrl}", r"\toprule",
             r"Model & Sparsity & Method & Avg & Baseline & Baseline Avg & Gain & 95\% CI & Basis \\", r"\midrule"]
    for row in gains.itertuples():
        cells = [row.model_name, format_sparsity_label(row.sparsity_label), method_display_name(row.method),
                 format_number(row.avg), method_display_name(row.baseline), format_number(row.baseline_avg),
                 signed(row.gain)]
        lines.append(" & ".join([latex_escape(c) for c in cells] + [_gain_interval(row, latex=True),
                                                                     latex_escape(row.basis)]) + r" \\")
    if gains.empty:
        lines.append(r"\multicolumn{9}{c}{no setting has both methods} \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for marker in _gain_markers(gains):
        lines.append(r"\par\footnotesize " + f"{marker.latex} {latex_escape(marker.meaning)}.")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def render_gains_markdown(gains: pd.DataFrame, baseline: str | Sequence[str] | None = None,
                          published_headline: dict[str, float] | None = None,
                          learned_methods: Sequence[str] | None = None) -> str:
    """The per-setting gains and one summary line per learned method (percent points)."""
    if gains.empty:
        learned = " or ".join(method_display_name(method) for method in
                              (methods_of_kind("learned") if learned_methods is None else learned_methods))
        return f"No setting has results for both {learned} and {baseline_name(baseline)}.\n"
    rows = [[row.model_name, format_sparsity_label(row.sparsity_label),
             method_display_name(row.method), format_number(row.avg),
             method_display_name(row.baseline), format_number(row.baseline_avg), signed(row.gain),
             _gain_interval(row), row.basis] for row in gains.itertuples()]
    headers = ["Model", "Sparsity", "Method", "Avg", "Baseline", "Baseline Avg", "Gain", "95% CI", "Basis"]
    parts = [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                      colalign=["left", "left", "left", "right", "left", "right", "right", "right", "left"]),
             ""]
    parts += [f"- {marker.symbol} {marker.meaning}." for marker in _gain_markers(gains)]
    if parts[-1]:
        parts.append("")
    summary = summarize_gains(gains)
    for method in summary["method"].unique():
        mine = summary[summary["method"] == method].set_index("sparsity_label")
        overall = mine.loc[ALL_SETTINGS]
        per_label = ", ".join(f"{signed(mine.loc[label, 'mean_gain'])} at {format_sparsity_label(label)}"
                              for label in mine.index if label != ALL_SETTINGS)
        line = (f"{method_display_name(method)} minus {baseline_name(baseline)}: mean "
                f"{signed(overall['mean_gain'])} points over {int(overall['n_settings'])} "
                f"(model, sparsity) settings ({per_label}).")
        parts.append(line)
    if published_headline:
        per_label = ", ".join(f"{signed(value)} at {format_sparsity_label(label)}"
                              for label, value in published_headline.items() if label != ALL_SETTINGS)
        parts.append(f"Published headline: {signed(published_headline[ALL_SETTINGS])} "
                     f"({per_label}).")
    return "\n".join(parts) + "\n"
