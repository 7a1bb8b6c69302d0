"""cells.csv: one row per ok cell, the records as they are (fractions), for machine use."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from prunebench.report.format import DIVERGED, csv_text, method_order, model_order, sparsity_label_order
from prunebench.report.frame import accuracy_tasks, diverged_mask, ok_rows, ppl_datasets
from prunebench.report.paper import reference_paper
from prunebench.store.atomic import write_text_atomic

IDENTITY_COLUMNS = ["model", "family", "method", "sparsity", "pattern", "sparsity_label",
                    "achieved_sparsity"]


def cells_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per ok cell (records as they are, fractions): identity columns, every
    `ppl_<dataset>` (+ `_seqlen`, + `diverged_<dataset>` when the frame has it: a diverged cell's
    perplexity is NaN here, "diverged" in the CSV), every `acc_<task>` (+ `stderr_<task>`), and
    `avg`: the mean of the paper-task accuracies present in the row or, if it has none, of all
    its accuracies."""
    frame = ok_rows(df)
    ppl_columns = []
    for dataset in ppl_datasets(frame):
        ppl_columns.append(f"ppl_{dataset}")
        if f"ppl_{dataset}_seqlen" in frame.columns:
            ppl_columns.append(f"ppl_{dataset}_seqlen")
        if f"diverged_{dataset}" in frame.columns:
            frame[f"diverged_{dataset}"] = diverged_mask(frame, dataset)
            ppl_columns.append(f"diverged_{dataset}")
    tasks = accuracy_tasks(frame)
    acc_columns = [f"acc_{task}" for task in tasks]
    stderr_columns = [f"stderr_{task}" for task in tasks if f"stderr_{task}" in frame.columns]
    paper_columns = [f"acc_{task}" for task in reference_paper().tasks if f"acc_{task}" in acc_columns]
    if acc_columns:
        paper_mean = frame[paper_columns].mean(axis=1) if paper_columns else pd.Series(math.nan, index=frame.index)
        frame["avg"] = paper_mean.where(paper_mean.notna(), frame[acc_columns].mean(axis=1))
    else:
        frame["avg"] = math.nan
    extra = [c for c in ("published_avg", "source", "mask_sha256", "last_attempt_status", "last_attempt_at",
                         "last_attempt_error") if c in frame.columns]
    columns = [c for c in IDENTITY_COLUMNS if c in frame.columns] + ppl_columns + acc_columns \
        + stderr_columns + ["avg"] + extra
    frame = frame[columns]
    if frame.empty:
        return frame.reset_index(drop=True)
    order = sorted(range(len(frame)), key=lambda i: (
        model_order(frame["model"].iat[i]), sparsity_label_order(frame["sparsity_label"].iat[i]),
        method_order(frame["method"].iat[i])))
    return frame.iloc[order].reset_index(drop=True)


def cells_csv_text(df: pd.DataFrame) -> str:
    """cells.csv: `cells_frame` with "diverged" in the perplexity of every diverged cell."""
    frame = cells_frame(df)
    for dataset in ppl_datasets(frame):
        mask = diverged_mask(frame, dataset)
        if mask.any():
            column = frame[f"ppl_{dataset}"].astype(object)
            column[mask] = DIVERGED
            frame[f"ppl_{dataset}"] = column
    return csv_text(frame)


def write_cells_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    return write_text_atomic(path, cells_csv_text(df))
