"""summary.md: one line per cell, the table a README quotes.

Each figure as mean ± seed SD (one seed: the value), its difference from the dense cell of the
same model with the report's 95% interval (differences.py: two-level over seeds, then windows /
items; "ⁿˢ" where it holds zero), the dense-relative metrics' means, and the range of the cells'
pruning and evaluation seconds over their seeds. The README copies this file between two marker
lines; tests/report/test_summary_table.py holds the two equal, so the README's figures are the
records' own.
"""
from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from prunebench.report.differences import acc_difference, ppl_difference
from prunebench.report.format import (DENSE_LABEL, dataset_display_name, format_difference, format_number,
                                      format_sd, format_sparsity_label, is_missing, method_display_name, method_order, model_order,
                                      sparsity_label_order, task_display_name)
from prunebench.report.frame import (CELL_KEYS, SEED_SD, accuracy_tasks, cell_value, collapse_duplicate_cells,
                                     ok_rows, ppl_cell_value, ppl_datasets, seed_count)
from prunebench.report.paper import PERCENT

CAPTION = ("Mean ± sample SD over the calibration seeds (a seed-invariant cell ran once); \"vs dense\": the "
           "difference from the dense model with its 95% two-level bootstrap interval (the seeds of each side, "
           "then the shared windows / items; ⁿˢ: the interval holds zero); KL: mean KL(dense || pruned) in "
           "nats per token; top-1: agreement with the dense model's top token (%); seconds: the range over "
           "the seeds.")


def _with_sd(row: pd.Series, column: str, value: float | None, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    sd = cell_value(row, column + SEED_SD) if seed_count(row) > 1 else None
    return format_number(value * scale) + format_sd(None if sd is None else sd * scale)


def _seconds(rows: pd.DataFrame, column: str) -> str:
    values = [v for v in rows[column].tolist() if not is_missing(v)] if column in rows else []
    if not values:
        return "-"
    lo, hi = round(min(values)), round(max(values))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def render_summary_markdown(df: pd.DataFrame) -> str:
    """The summary table(s), one per model, as markdown (with the caption)."""
    raw = ok_rows(df)
    frame = collapse_duplicate_cells(raw)
    if frame.empty:
        return "No ok record.\n"
    datasets, tasks = ppl_datasets(frame), accuracy_tasks(frame)
    parts = [CAPTION, ""]
    models = sorted(frame["model"].unique(), key=model_order)
    for model in models:
        cells = frame[frame["model"] == model]
        dense = next((r for _, r in cells.iterrows() if r["sparsity_label"] == DENSE_LABEL), None)
        headers = ["Method", "Sparsity", "Seeds"]
        for dataset in datasets:
            headers += [f"{dataset_display_name(dataset)} PPL", "vs dense [95% CI]", "KL", "top-1 %"]
        for task in tasks:
            headers += [f"{task_display_name(task)} acc %", "vs dense, points [95% CI]"]
        headers += ["prune s", "eval s"]
        order = sorted(range(len(cells)), key=lambda i: (
            sparsity_label_order(cells["sparsity_label"].iat[i]), method_order(cells["method"].iat[i])))
        table = []
        for _, row in cells.iloc[order].iterrows():
            is_dense = row["sparsity_label"] == DENSE_LABEL
            line = [method_display_name(row["method"]), format_sparsity_label(str(row["sparsity_label"])), str(seed_count(row))]
            for dataset in datasets:
                d = None if is_dense or dense is None else ppl_difference(row, dense, dataset)
                kl, top1 = cell_value(row, f"kl_{dataset}"), cell_value(row, f"top1_{dataset}")
                line += [_with_sd(row, f"ppl_{dataset}", ppl_cell_value(row, dataset)),
                         format_difference(d) or "-",
                         "-" if kl is None else f"{kl:.3f}", "-" if top1 is None else f"{top1 * PERCENT:.1f}"]
            for task in tasks:
                d = None if is_dense or dense is None else acc_difference(row, dense, task)
                line += [_with_sd(row, f"acc_{task}", cell_value(row, f"acc_{task}"), PERCENT),
                         format_difference(d) or "-"]
            same = raw[(raw[CELL_KEYS] == row[CELL_KEYS]).all(axis=1)]
            line += [_seconds(same, "prune_s"), _seconds(same, "eval_s")]
            table.append(line)
        if len(models) > 1:
            parts += [f"### {model}", ""]
        parts += [tabulate(table, headers=headers, tablefmt="github", disable_numparse=True), ""]
    return "\n".join(parts).rstrip() + "\n"
