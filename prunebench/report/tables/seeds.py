"""seeds.csv / seeds.md: how much the calibration seed moves each figure of the seed-dependent
cells, beside the half-width of the interval a single seed's evaluation prints."""
from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from prunebench.report import uncertainty
from prunebench.report.differences import acc_payloads, ppl_payloads
from prunebench.report.format import (DENSE_LABEL, format_number, format_sparsity_label, is_missing,
                                      method_display_name, method_order, model_order, sparsity_label_order)
from prunebench.report.frame import (PER_SEED, SEED_SD, cell_value, collapse_duplicate_cells, figure_columns,
                                     is_dense, ok_rows, raw_cell, seed_count, truthy)
from prunebench.report.paper import PERCENT

def seeds_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, figure) of the seed-dependent cells: the seeds, the per-seed values,
    their mean and sample SD, and beside them the half-width of the evaluation-only 95% interval
    of the cell's difference from its model's dense cell (the window / item bootstrap of one seed,
    averaged over the seeds): how the calibration draw's noise compares with what one seed's
    interval covers. Perplexity in ppl, accuracies in percent points."""
    frame = collapse_duplicate_cells(ok_rows(df))
    columns = ["model", "method", "sparsity", "metric", "n_seeds", "seeds", "per_seed", "mean", "sd",
               "eval_half_width", "sd_over_half_width"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    dense = {r["model"]: r for _, r in frame[frame["sparsity_label"] == DENSE_LABEL].iterrows()}
    rows = []
    for _, row in frame.iterrows():
        if is_dense(row) or not truthy(raw_cell(row, "seed_dependent")):
            continue
        base = dense.get(row["model"])
        for metric in figure_columns(frame):
            values = raw_cell(row, metric + PER_SEED)
            if not values or all(v is None for v in values):
                continue
            scale = 1.0 if metric.startswith("ppl_") else PERCENT
            half = _eval_half_width(row, base, metric) if base is not None else None
            sd = cell_value(row, metric + SEED_SD)
            rows.append({"model": row["model"], "method": row["method"], "sparsity": row["sparsity_label"],
                         "metric": metric, "n_seeds": seed_count(row), "seeds": " ".join(map(str, row["seeds"])),
                         "per_seed": " ".join("-" if v is None else format_number(v * scale) for v in values),
                         "mean": cell_value(row, metric) * scale if cell_value(row, metric) is not None else None,
                         "sd": None if sd is None else sd * scale,
                         "eval_half_width": half,
                         "sd_over_half_width": None if sd is None or not half else sd * scale / half})
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    order = sorted(range(len(out)), key=lambda i: (model_order(out["model"].iat[i]),
                                                   not out["metric"].iat[i].startswith("ppl_"), out["metric"].iat[i],
                                                   sparsity_label_order(out["sparsity"].iat[i]),
                                                   method_order(out["method"].iat[i])))
    return out.iloc[order].reset_index(drop=True)


def _eval_half_width(row: pd.Series, base: pd.Series, metric: str) -> float | None:
    """Mean over the row's seeds of the half-width of the one-seed interval against `base`."""
    widths = []
    if metric.startswith("ppl_"):
        dataset = metric[len("ppl_"):]
        base_payload = ppl_payloads(base, dataset)[0]
        for payload in ppl_payloads(row, dataset):
            interval = uncertainty.compare_ppl(payload, base_payload)
            if interval is not None:
                widths.append((interval.hi - interval.lo) / 2)
    else:
        task = metric[len("acc_"):]
        base_payload = acc_payloads(base, task)[0]
        for payload in acc_payloads(row, task):
            interval = uncertainty.compare_acc(payload, base_payload)
            if interval is not None:
                widths.append((interval.hi - interval.lo) / 2 * PERCENT)
    return sum(widths) / len(widths) if widths else None


def render_seeds_markdown(seeds: pd.DataFrame) -> str:
    if seeds.empty:
        return "No cell depends on the seed here.\n"
    head = ("Seed-dependent cells over their calibration seeds: the per-seed values, mean and sample SD, "
            "beside the half-width of one seed's evaluation-only 95% interval against dense (window / item "
            "bootstrap). SD / half-width near or above 1/2 means the seed moves a figure by as much as the "
            "interval a single seed prints.\n\n")
    rows = [[r.model, method_display_name(r.method), format_sparsity_label(str(r.sparsity)), r.metric, r.seeds,
             r.per_seed, format_number(r.mean), "-" if is_missing(r.sd) else format_number(r.sd),
             "-" if is_missing(r.eval_half_width) else format_number(r.eval_half_width),
             "-" if is_missing(r.sd_over_half_width) else format_number(r.sd_over_half_width)]
            for r in seeds.itertuples()]
    return head + tabulate(rows, headers=["Model", "Method", "Sparsity", "Metric", "Seeds", "Per seed", "Mean",
                                          "SD", "Eval-only half-width", "SD / half-width"],
                           tablefmt="github", disable_numparse=True) + "\n"
