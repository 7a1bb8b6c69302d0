"""comparisons.csv: every difference the report shows, one row each, with its 95% interval, for
machine use (the HTML page, `prunebench compare` and the reproduction check read it too)."""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from prunebench.report.differences import (DENSE_RELATIVE_METRICS, acc_difference, avg_acc_difference,
                                           dense_relative_differences, ppl_difference)
from prunebench.report.format import DENSE_LABEL, method_order, model_order, sparsity_label_order
from prunebench.sparsity.hybrid import LABEL as HYBRID_LABEL
from prunebench.report.frame import (accuracy_tasks, cell_value, collapse_duplicate_cells, is_dense, ok_rows,
                                     ppl_cell_value, ppl_datasets, resolve_tasks, seed_count)
from prunebench.report.paper import PERCENT

COMPARISON_COLUMNS = ["model", "sparsity", "method", "baseline", "metric", "diff", "lo", "hi",
                      "significant", "pattern", "unit", "value", "baseline_value", "rel_diff",
                      "rel_lo", "rel_hi", "n", "note", "baseline_sparsity", "n_seeds", "baseline_n_seeds",
                      "noise"]


def comparisons_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Every difference the report shows, one row each, for machine use (comparisons.csv, the
    HTML page).

    Each pruned cell against the dense cell of its model, and every pair of methods in the same
    (model, pattern, sparsity) setting, once (the later in `method_order` minus the earlier: a
    learned method minus a layer-wise one, "wanda+owl" minus "wanda"); on every perplexity
    dataset (metric `ppl_<dataset>`, unit "ppl", plus the relative difference rel_diff / rel_lo /
    rel_hi as fractions), every task (`acc_<task>`, percent points) and the average over the
    layout's tasks (`avg_acc`, points, items resampled within each task). A dense-or-2:4 tile
    cell is also compared with every 2:4 cell of its model and with its method's sparser tile
    targets. `sparsity` is the sparsity label ("0.5", "2:4", "hybrid:0.35/64"), `baseline_sparsity`
    the baseline's; diff = method - baseline; [lo, hi] its 95% paired-bootstrap
    interval, over the seeds of each side and then the windows / items (see
    uncertainty.bootstrap_ppl_diff_seeds); n_seeds / baseline_n_seeds the seeds behind each side
    and `noise` what the interval covers (EVAL_ONLY: a seed-dependent side has one seed);
    significant = the interval excludes zero (None without an interval; `note` says why: no
    per-item data, not comparable, diverged).
    """
    frame = collapse_duplicate_cells(ok_rows(df))
    rows: list[dict] = []
    if frame.empty:
        return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    datasets, tasks, avg_tasks = ppl_datasets(frame), accuracy_tasks(frame), resolve_tasks(frame)
    dense = {}
    for _, row in frame[frame["sparsity_label"] == DENSE_LABEL].iterrows():
        dense.setdefault(row["model"], row)

    for _, row in frame.iterrows():
        if is_dense(row):
            continue
        baselines = [dense[row["model"]]] if row["model"] in dense else []
        # every other method of the same model, pattern and target that sorts before this one
        same = frame[(frame["model"] == row["model"]) & (frame["pattern"] == row["pattern"])
                     & (frame["sparsity_label"] == row["sparsity_label"])]
        baselines += [base for _, base in same.iterrows()
                      if (method_order(base["method"]), base["method"]) < (method_order(row["method"]), row["method"])]
        if HYBRID_LABEL.fullmatch(str(row["sparsity_label"])):
            # dense-or-2:4 tiles (PATCH's claim): against every plain 2:4 cell of the model, and
            # against the same method's sparser tile targets (each pair once)
            same_model = frame[frame["model"] == row["model"]]
            baselines += [base for _, base in same_model[same_model["pattern"] == "2:4"].iterrows()]
            for _, base in same_model[same_model["method"] == row["method"]].iterrows():
                other = HYBRID_LABEL.fullmatch(str(base["sparsity_label"]))
                if other and float(other.group(1)) > float(row["sparsity"]):
                    baselines.append(base)
        for base in baselines:
            rows += pair_rows(row, base, datasets, tasks, avg_tasks)
    return _comparison_table(rows)


def pair_rows(row: pd.Series, base: pd.Series, datasets: Sequence[str], tasks: Sequence[str],
              avg_tasks: Sequence[str]) -> list[dict]:
    """Every metric's difference row - base (collapsed rows), as COMPARISON_COLUMNS dicts: each
    perplexity dataset, each task and the average over `avg_tasks` both measured."""
    out = []

    def add(metric, unit, value, base_value, d):
        if d is None:
            return
        n_seeds = d.n_seeds or (seed_count(row), seed_count(base))
        out.append({"model": row["model"], "sparsity": row["sparsity_label"], "method": row["method"],
                    "baseline": base["method"], "baseline_sparsity": base["sparsity_label"], "metric": metric,
                    "diff": d.diff, "lo": d.lo, "hi": d.hi, "significant": d.significant, "pattern": row["pattern"],
                    "unit": unit, "value": value, "baseline_value": base_value, "rel_diff": d.rel_diff,
                    "rel_lo": d.rel_lo, "rel_hi": d.rel_hi, "n": d.n, "note": d.note, "n_seeds": n_seeds[0],
                    "baseline_n_seeds": n_seeds[1], "noise": d.noise})

    for dataset in datasets:
        add(f"ppl_{dataset}", "ppl", ppl_cell_value(row, dataset), ppl_cell_value(base, dataset),
            ppl_difference(row, base, dataset))
    for task in tasks:
        a, b = cell_value(row, f"acc_{task}"), cell_value(base, f"acc_{task}")
        add(f"acc_{task}", "points", None if a is None else a * PERCENT, None if b is None else b * PERCENT,
            acc_difference(row, base, task))
    for dataset in datasets:
        for metric, (a, b, d) in dense_relative_differences(row, base, dataset).items():
            add(f"{DENSE_RELATIVE_METRICS[metric][0]}{dataset}", DENSE_RELATIVE_METRICS[metric][1], a, b, d)
    common = [t for t in avg_tasks
              if cell_value(row, f"acc_{t}") is not None and cell_value(base, f"acc_{t}") is not None]
    if common:
        add("avg_acc", "points", sum(cell_value(row, f"acc_{t}") for t in common) / len(common) * PERCENT,
            sum(cell_value(base, f"acc_{t}") for t in common) / len(common) * PERCENT,
            avg_acc_difference(row, base, common))
    return out


def _comparison_table(rows: list[dict]) -> pd.DataFrame:
    """COMPARISON_COLUMNS rows as a typed frame in model / sparsity / method / baseline order."""
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    # A diverged side has no finite value to print: NaN in the frame, "diverged" via `note`.
    for column in ("value", "baseline_value"):
        out[column] = out[column].map(lambda v: math.nan if v is None or math.isinf(v) else v)
    for column in ("diff", "lo", "hi", "rel_diff", "rel_lo", "rel_hi"):
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    for column in ("n", "n_seeds", "baseline_n_seeds"):
        out[column] = out[column].astype("Int64")
    if out.empty:
        return out
    order = sorted(range(len(out)), key=lambda i: (
        model_order(out["model"].iat[i]), sparsity_label_order(out["sparsity"].iat[i]),
        method_order(out["method"].iat[i]), method_order(out["baseline"].iat[i]), out["metric"].iat[i]))
    return out.iloc[order].reset_index(drop=True)
