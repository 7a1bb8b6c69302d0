"""`prunebench compare`: any method against any method, from the records of one results directory.

For every (model, pattern, sparsity) setting both methods were run at (or the one asked for),
every metric's difference A - B with its 95% two-level bootstrap interval (the seeds of each
side, then the shared windows / items), the seeds and windows / items behind it, and a verdict.
The same rows as the report's comparisons.csv, for a pair the report does not list by default.
"""
from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate

from .. import registry
from ..errors import UserError
from .differences import EVAL_ONLY
from .format import DENSE_LABEL, format_number, format_sparsity_label
from .frame import accuracy_tasks, collapse_duplicate_cells, ok_rows, ppl_datasets, resolve_tasks
from .tables.comparisons import pair_rows

BETTER_LOWER = ("ppl", "nats")  # units whose smaller value is better (perplexity, KL); points are better higher


def _resolve(method: str) -> str:
    try:
        return registry.resolve(method)
    except UserError:
        return method  # a plugin not loaded here: its records still carry its name


def compare_methods(df: pd.DataFrame, a: str, b: str, *, model: str | None = None,
                    sparsity: str | None = None) -> pd.DataFrame:
    """Rows of `pair_rows` (COMPARISON_COLUMNS) for A minus B at every shared setting; a one-line
    UserError when a method has no ok records, or none at the asked model / sparsity."""
    frame = collapse_duplicate_cells(ok_rows(df))
    a, b = _resolve(a), _resolve(b)
    if a == b:
        raise UserError(f"compare needs two different methods, got {a!r} twice")
    known = sorted(set(frame["method"])) if not frame.empty else []
    for method in (a, b):
        if method not in known:
            raise UserError(f"no ok records of method {method!r} in this results directory",
                            hint=f"methods with records: {', '.join(known) or 'none'}")
    if model is not None:
        frame = frame[frame["model"] == model]
        if frame.empty:
            raise UserError(f"no records of model {model!r}", hint="see the model ids in the report's cells.csv")
    side = {m: frame[frame["method"] == m] for m in (a, b)}
    if sparsity is not None:
        for m in (a, b):
            labels = sorted(set(side[m]["sparsity_label"]))
            if m != "dense" and sparsity not in labels:
                raise UserError(f"method {m!r} was not run at sparsity {sparsity!r}",
                                hint=f"its sparsities here: {', '.join(labels) or 'none'}")
    datasets, tasks, avg_tasks = ppl_datasets(frame), accuracy_tasks(frame), resolve_tasks(frame)
    rows = []
    for _, row in side[a].iterrows():
        if sparsity is not None and row["sparsity_label"] not in (sparsity, DENSE_LABEL):
            continue
        for _, base in side[b].iterrows():
            same = (base["model"] == row["model"] and base["pattern"] == row["pattern"]
                    and base["sparsity_label"] == row["sparsity_label"])
            dense_side = DENSE_LABEL in (row["sparsity_label"], base["sparsity_label"]) and base["model"] == row["model"]
            if same or dense_side:
                rows += pair_rows(row, base, datasets, tasks, avg_tasks)
    if not rows:
        raise UserError(f"{a} and {b} share no setting (model, pattern, sparsity) with results",
                        hint="run both at the same sparsity, or name one with --sparsity")
    return pd.DataFrame(rows)


def verdict(row) -> str:
    """"A better" / "B better" when the interval excludes zero, else "not significant"; with
    EVAL_ONLY noise the verdict says that the seed's noise is missing."""
    if row["lo"] is None or pd.isna(row["lo"]):
        return f"no interval ({row['note']})" if isinstance(row["note"], str) else "no interval"
    if not row["significant"]:
        text = "not significant"
    else:
        lower_better = row["unit"] in BETTER_LOWER
        a_better = (row["diff"] < 0) if lower_better else (row["diff"] > 0)
        text = f"{row['method'] if a_better else row['baseline']} better"
    if row["noise"] == EVAL_ONLY:
        text += " (evaluation noise only)"
    return text


def _num(value, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if unit == "nats" else format_number(value)


def render(rows: pd.DataFrame) -> str:
    """The comparison as a github table, one line per (setting, metric)."""
    table = []
    for _, r in rows.iterrows():
        unit = {"points": "pts", "nats": "nats"}.get(r["unit"], "")
        f = ".3g" if r["unit"] == "nats" else ".2f"  # a KL gap of 0.004 nats is no rounding error
        table.append([r["model"], format_sparsity_label(str(r["sparsity"])), r["metric"],
                      _num(r["value"], r["unit"]), _num(r["baseline_value"], r["unit"]),
                      f"{r['diff']:+{f}}{unit and ' ' + unit}",
                      "-" if pd.isna(r["lo"]) else f"[{r['lo']:+{f}}, {r['hi']:+{f}}]",
                      f"{int(r['n_seeds'])} vs {int(r['baseline_n_seeds'])}", "-" if pd.isna(r["n"]) else int(r["n"]),
                      verdict(r)])
    a, b = rows["method"].iat[0], rows["baseline"].iat[0]
    head = (f"{a} minus {b}: difference with its 95% interval (two-level bootstrap: each side's seeds, "
            f"then the shared windows / items)")
    return head + "\n\n" + tabulate(table, headers=["model", "sparsity", "metric", a, b, "A - B", "95% interval",
                                                    "seeds A vs B", "windows / items", "verdict"],
                                    tablefmt="github", disable_numparse=True) + "\n"
