"""The dense-relative metrics in the report: mean KL(dense || pruned), its 99th percentile and
top-1 agreement with the dense model, per cell with a 95% two-level bootstrap interval (the
seeds, then the windows), and as paired differences between two cells (comparisons.csv,
`prunebench compare`). A record without them (older ones) has no row here; nothing is invented.
"""
from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate

from . import uncertainty
# the frame helpers of the tables this report sits beside
from .tables import (DENSE_LABEL, MEAN_OF_RECORDS, Difference, _cell, _int_cell, _noise, _per_seed, _several_records,
                     _value, collapse_duplicate_cells, method_order, model_order, ok_rows, sparsity_label_order)

# metric -> (frame column prefix, unit in comparisons, display scale, label)
METRICS = {"kl_mean": ("kl_", "nats", 1.0, "KL"), "kl_p99": ("kl_p99_", "nats", 1.0, "KL p99"),
           "top1": ("top1_", "points", 100.0, "top-1 %")}
DENSE_RELATIVE_CSV, DENSE_RELATIVE_MD = "dense_relative.csv", "dense_relative.md"


def datasets(frame: pd.DataFrame) -> list[str]:
    return [c[len("window_kl_"):] for c in frame.columns
            if c.startswith("window_kl_") and not c.startswith("window_kl_hist_") and not c.endswith("_per_seed")
            and frame[c].map(lambda v: isinstance(v, list)).any()]


def _side(row: pd.Series, dataset: str) -> dict | None:
    side = {"kl": _per_seed(row, f"window_kl_{dataset}"), "top1": _per_seed(row, f"window_top1_{dataset}"),
            "hist": _per_seed(row, f"window_kl_hist_{dataset}")}
    return None if any(v is None for vs in side.values() for v in vs) else side


def _window_tokens(row: pd.Series, dataset: str) -> int | None:
    return _int_cell(row, f"window_tokens_{dataset}")


def cell_intervals(row: pd.Series, dataset: str) -> dict | None:
    """{metric: Interval of the cell's own value} or None when it has no per-window values."""
    side, tokens = _side(row, dataset), _window_tokens(row, dataset)
    return None if side is None or not tokens else uncertainty.dense_relative_intervals(side, None, tokens)


def differences(row: pd.Series, base: pd.Series, dataset: str) -> dict:
    """{metric: (value, base value, Difference)} for row - base, in display units; empty when either
    side lacks the metrics. Paired: both sides' windows must be the same windows."""
    a_side, b_side = _side(row, dataset), _side(base, dataset)
    if a_side is None or b_side is None:
        return {}
    n_seeds, noise = _noise(row, base)
    same = _cell(row, f"windows_fp_{dataset}") == _cell(base, f"windows_fp_{dataset}")
    tokens = _window_tokens(row, dataset)
    intervals = None
    if same and tokens and tokens == _window_tokens(base, dataset) and not _several_records(row, base):
        intervals = uncertainty.dense_relative_intervals(a_side, b_side, tokens)
    out = {}
    for metric, (prefix, _, scale, _) in METRICS.items():
        a, b = _value(row, f"{prefix}{dataset}"), _value(base, f"{prefix}{dataset}")
        if a is None or b is None:
            continue
        a, b = a * scale, b * scale
        if intervals is None:
            note = MEAN_OF_RECORDS if _several_records(row, base) else "not scored on the same windows"
            out[metric] = (a, b, Difference(a - b, note=note, n_seeds=n_seeds, noise=noise))
        else:
            i = intervals[metric]
            out[metric] = (a, b, Difference(a - b, i.lo * scale, i.hi * scale, n=i.n, n_seeds=n_seeds, noise=noise))
    return out


def dense_relative_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, dataset) with the metrics: value, 95% interval, seeds, k."""
    frame = collapse_duplicate_cells(ok_rows(df))
    rows = []
    for _, row in frame.iterrows():
        for dataset in datasets(frame):
            if _value(row, f"kl_{dataset}") is None:
                continue
            # the dense cell's are exact by definition: no interval to draw
            dense = row["sparsity_label"] == DENSE_LABEL
            intervals = {} if dense else cell_intervals(row, dataset) or {}
            out = {"model": row["model"], "method": row["method"], "sparsity": row["sparsity_label"],
                   "dataset": dataset, "k": _int_cell(row, f"dense_k_{dataset}"), "n_seeds": int(row.get("n_seeds", 1))}
            for metric, (prefix, _, scale, _) in METRICS.items():
                value = _value(row, f"{prefix}{dataset}")
                i = intervals.get(metric)
                out[metric] = None if value is None else value * scale
                out[f"{metric}_lo"] = out[metric] if dense else None if i is None else i.lo * scale
                out[f"{metric}_hi"] = out[metric] if dense else None if i is None else i.hi * scale
            rows.append(out)
    columns = ["model", "method", "sparsity", "dataset", "k", "n_seeds"] + [
        c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi")]
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    order = sorted(range(len(out)), key=lambda i: (model_order(out["model"].iat[i]), out["dataset"].iat[i],
                                                   sparsity_label_order(out["sparsity"].iat[i]),
                                                   method_order(out["method"].iat[i])))
    return out.iloc[order].reset_index(drop=True)


def _fmt(value, lo, hi, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}g}" if digits else f"{value:.2f}"
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return text
    return text + (f" [{lo:.{digits}g}, {hi:.{digits}g}]" if digits else f" [{lo:.2f}, {hi:.2f}]")


CAPTION = ("KL(dense || pruned) per token in nats (mean, and the 99th percentile as the upper edge of its "
           "log-spaced bin) and top-1 agreement with the dense model (%), each with its 95% bootstrap "
           "interval (the cell's seeds, then the windows). The KL is over the dense model's top-k tokens plus "
           "one bucket for the rest: a lower bound of the exact KL. The dense model's own are 0 and 100% by "
           "definition.")


def render_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "No record carries dense-relative metrics.\n"
    table = [[r["model"], r["dataset"], r["method"], r["sparsity"], r["n_seeds"],
              _fmt(r["kl_mean"], r["kl_mean_lo"], r["kl_mean_hi"], 3),
              _fmt(r["kl_p99"], r["kl_p99_lo"], r["kl_p99_hi"], 3),
              _fmt(r["top1"], r["top1_lo"], r["top1_hi"], 0), r["k"]] for _, r in frame.iterrows()]
    return CAPTION + "\n\n" + tabulate(table, headers=["model", "dataset", "method", "sparsity", "seeds", "KL mean",
                                                      "KL p99", "top-1 %", "k"],
                                       tablefmt="github", disable_numparse=True) + "\n"
