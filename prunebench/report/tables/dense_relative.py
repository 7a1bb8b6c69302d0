"""The dense-relative table: mean KL(dense || pruned), its 99th percentile and top-1 agreement
with the dense model, per cell with a 95% two-level bootstrap interval (the seeds, then the
windows). A record without them (older ones) has no row here; nothing is invented. Their paired
differences between two cells are in differences.py (comparisons.csv, `prunebench compare`).
"""
from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate

from prunebench.report.differences import DENSE_RELATIVE_METRICS, dense_relative_cell_intervals
from prunebench.report.format import DENSE_LABEL, method_order, model_order, sparsity_label_order
from prunebench.report.frame import cell_value, collapse_duplicate_cells, int_cell, ok_rows

CAPTION = ("KL(dense || pruned) per token in nats (mean, and the 99th percentile as the upper edge of its "
           "log-spaced bin) and top-1 agreement with the dense model (%), each with its 95% bootstrap "
           "interval (the cell's seeds, then the windows). The KL is over the dense model's top-k tokens plus "
           "one bucket for the rest: a lower bound of the exact KL. The dense model's own are 0 and 100% by "
           "definition.")


def datasets(frame: pd.DataFrame) -> list[str]:
    """The perplexity texts whose records carry per-window dense-relative metrics."""
    return [c[len("window_kl_"):] for c in frame.columns
            if c.startswith("window_kl_") and not c.startswith("window_kl_hist_") and not c.endswith("_per_seed")
            and frame[c].map(lambda v: isinstance(v, list)).any()]


def dense_relative_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, dataset) with the metrics: value, 95% interval, seeds, k."""
    frame = collapse_duplicate_cells(ok_rows(df))
    rows = []
    for _, row in frame.iterrows():
        for dataset in datasets(frame):
            if cell_value(row, f"kl_{dataset}") is None:
                continue
            # the dense cell's are exact by definition: no interval to draw
            dense = row["sparsity_label"] == DENSE_LABEL
            intervals = {} if dense else dense_relative_cell_intervals(row, dataset) or {}
            out = {"model": row["model"], "method": row["method"], "sparsity": row["sparsity_label"],
                   "dataset": dataset, "k": int_cell(row, f"dense_k_{dataset}"), "n_seeds": int(row.get("n_seeds", 1))}
            for metric, (prefix, _, scale, _) in DENSE_RELATIVE_METRICS.items():
                value = cell_value(row, f"{prefix}{dataset}")
                i = intervals.get(metric)
                out[metric] = None if value is None else value * scale
                out[f"{metric}_lo"] = out[metric] if dense else None if i is None else i.lo * scale
                out[f"{metric}_hi"] = out[metric] if dense else None if i is None else i.hi * scale
            rows.append(out)
    columns = ["model", "method", "sparsity", "dataset", "k", "n_seeds"] + [
        c for m in DENSE_RELATIVE_METRICS for c in (m, f"{m}_lo", f"{m}_hi")]
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    order = sorted(range(len(out)), key=lambda i: (model_order(out["model"].iat[i]), out["dataset"].iat[i],
                                                   sparsity_label_order(out["sparsity"].iat[i]),
                                                   method_order(out["method"].iat[i])))
    return out.iloc[order].reset_index(drop=True)


def format_metric(value, lo, hi, digits: int) -> str:
    """A metric with its interval: `digits` significant digits, or two decimals when 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}g}" if digits else f"{value:.2f}"
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return text
    return text + (f" [{lo:.{digits}g}, {hi:.{digits}g}]" if digits else f" [{lo:.2f}, {hi:.2f}]")


def render_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "No record carries dense-relative metrics.\n"
    table = [[r["model"], r["dataset"], r["method"], r["sparsity"], r["n_seeds"],
              format_metric(r["kl_mean"], r["kl_mean_lo"], r["kl_mean_hi"], 3),
              format_metric(r["kl_p99"], r["kl_p99_lo"], r["kl_p99_hi"], 3),
              format_metric(r["top1"], r["top1_lo"], r["top1_hi"], 0), r["k"]] for _, r in frame.iterrows()]
    return CAPTION + "\n\n" + tabulate(table, headers=["model", "dataset", "method", "sparsity", "seeds", "KL mean",
                                                      "KL p99", "top-1 %", "k"],
                                       tablefmt="github", disable_numparse=True) + "\n"
