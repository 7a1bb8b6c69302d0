"""The records frame as the tables read it: the rows that may be tabled, the cells of one row,
which perplexity texts and tasks a frame measured, and one row per cell over its seeds.

Input: a DataFrame of run records, one row per record (prunebench.store.records.records_frame),
or the paper's reference data (prunebench.report.paper.paper_reference_frame), which uses the
same columns. Accuracies are fractions. Only rows with status "ok" are tabled; dense rows are
labelled "dense" and belong to every sparsity block.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from prunebench.report import uncertainty
from prunebench.report.format import DEFAULT_PATTERN, DENSE_LABEL, derive_sparsity_label, is_missing
from prunebench.report.paper import reference_paper

CELL_KEYS = ["model", "method", "pattern", "sparsity_label"]
PER_SEED = "_per_seed"   # suffix: a figure's (or a score vector's) values in seed order
SEED_SD = "_sd"          # suffix: a figure's sample SD over seeds


# ----------------------------------------------------------------------------- rows

def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that may be tabled (status "ok"), with `pattern` and `sparsity_label` filled in
    and every dense row labelled "dense"."""
    frame = df.copy()
    if "status" in frame.columns:
        frame = frame[frame["status"].fillna("ok") == "ok"].copy()
    if "pattern" not in frame.columns:
        frame["pattern"] = DEFAULT_PATTERN
    frame["pattern"] = frame["pattern"].fillna(DEFAULT_PATTERN)
    if "sparsity" not in frame.columns:
        frame["sparsity"] = math.nan
    if frame.empty:
        frame["sparsity_label"] = pd.Series(dtype=str)
        return frame.reset_index(drop=True)
    derived = frame.apply(derive_sparsity_label, axis=1)
    if "sparsity_label" in frame.columns:
        labels = frame["sparsity_label"].astype("object")
        frame["sparsity_label"] = labels.where(labels.notna(), derived).astype(str)
    else:
        frame["sparsity_label"] = derived
    frame.loc[frame["method"] == "dense", "sparsity_label"] = DENSE_LABEL
    return frame.reset_index(drop=True)


def is_dense(row: pd.Series) -> bool:
    return row["sparsity_label"] == DENSE_LABEL


def cell_value(row: pd.Series | None, column: str) -> float | None:
    """A number cell as a float, None when absent or missing."""
    if row is None or column not in row.index:
        return None
    value = row[column]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def truthy(value) -> bool:
    """A flag cell: True / 1.0 (or a mean > 0 after collapsing duplicates); NaN / None is False."""
    if is_missing(value):
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value > 0) if isinstance(value, (int, float)) else bool(value)


def raw_cell(row: pd.Series | None, column: str):
    """A raw cell (lists, strings), None when absent or missing."""
    if row is None or column not in row.index or is_missing(row[column]):
        return None
    return row[column]


def int_cell(row: pd.Series, column: str) -> int | None:
    value = cell_value(row, column)
    return None if value is None else int(value)


def seed_count(row: pd.Series) -> int:
    """The seeds behind a row: `n_seeds` after collapsing, else one."""
    return int(cell_value(row, "n_seeds") or 1)


def ppl_cell_value(row: pd.Series | None, dataset: str) -> float | None:
    """The perplexity to print: the value, inf for a diverged cell (printed "diverged"), None if
    not measured."""
    value = cell_value(row, f"ppl_{dataset}")
    if row is not None and (truthy(raw_cell(row, f"diverged_{dataset}"))
                            or (value is not None and not math.isfinite(value))):
        return math.inf
    return value


# ----------------------------------------------------------------------------- what was measured

def _present(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and frame[column].notna().any()


def accuracy_tasks(df: pd.DataFrame) -> list[str]:
    """Every task with at least one accuracy value: paper tasks in paper order, then the rest."""
    paper_tasks = reference_paper().tasks
    tasks = [column[len("acc_"):] for column in df.columns
             if column.startswith("acc_") and not column.endswith((PER_SEED, SEED_SD)) and _present(df, column)]
    return [task for task in paper_tasks if task in tasks] + sorted(
        task for task in tasks if task not in paper_tasks)


def resolve_tasks(df: pd.DataFrame, tasks: Sequence[str] | None = None) -> list[str]:
    """The accuracy columns of the paper layout: the given tasks; else the paper's six tasks
    whenever any of them was measured (missing ones show as "-"); else every measured task."""
    if tasks is not None:
        return list(tasks)
    paper_tasks = reference_paper().tasks
    measured = accuracy_tasks(df)
    if any(task in paper_tasks for task in measured):
        return list(paper_tasks)
    return measured


def diverged_mask(df: pd.DataFrame, dataset: str) -> pd.Series:
    """Rows whose perplexity on `dataset` diverged (flagged, or a non-finite value)."""
    mask = pd.Series(False, index=df.index)
    column = f"ppl_{dataset}"
    if column in df.columns:
        values = pd.to_numeric(df[column], errors="coerce")
        mask |= values.isin([math.inf, -math.inf])
    flag = f"diverged_{dataset}"
    if flag in df.columns:
        mask |= df[flag].map(truthy)
    return mask


def has_ppl(df: pd.DataFrame, dataset: str) -> pd.Series:
    """Rows with a perplexity on `dataset`, a diverged one included."""
    return df[f"ppl_{dataset}"].notna() | diverged_mask(df, dataset)


def ppl_datasets(df: pd.DataFrame) -> list[str]:
    """Every perplexity dataset with at least one value (or diverged cell), WikiText-2 (the
    paper's) first."""
    paper_dataset = reference_paper().ppl_dataset
    datasets = sorted(
        column[len("ppl_"):] for column in df.columns
        if column.startswith("ppl_") and not column.endswith(("_seqlen", PER_SEED, SEED_SD))
        and has_ppl(df, column[len("ppl_"):]).any())
    return sorted(datasets, key=lambda name: (name != paper_dataset, name))


def ppl_seqlens(df: pd.DataFrame, dataset: str) -> list[int]:
    column = f"ppl_{dataset}_seqlen"
    if column not in df.columns:
        return []
    values = df.loc[has_ppl(df, dataset), column].dropna()
    return sorted({int(value) for value in values})


def average_accuracy(df: pd.DataFrame, tasks: Sequence[str] | None = None,
                     use_published: bool = True) -> pd.Series:
    """Per row: the plain mean of the task accuracies present (fractions). Rows without any task
    cell fall back to `published_avg` when `use_published` (paper rows published as PPL / Avg)."""
    tasks = resolve_tasks(df, tasks)
    columns = [f"acc_{task}" for task in tasks if f"acc_{task}" in df.columns]
    means = df[columns].mean(axis=1, skipna=True) if columns else pd.Series(math.nan, index=df.index)
    if use_published and "published_avg" in df.columns:
        means = means.where(means.notna(), df["published_avg"])
    return means


def carries_item_scores(df: pd.DataFrame) -> bool:
    """Whether the frame has per-window / per-item columns (records_frame adds them for every
    record, None where a record predates them); frames without them (the paper's numbers,
    hand-made frames) get no interval annotations."""
    return any(c.startswith(("window_nll_", "per_item_")) for c in df.columns)


# ----------------------------------------------------------------------------- one row per cell

def figure_columns(frame: pd.DataFrame) -> list[str]:
    """The figures a cell reports per seed: every perplexity and accuracy column."""
    return [c for c in frame.columns if (c.startswith("ppl_") and not c.endswith("_seqlen") or c.startswith("acc_"))
            and not c.endswith((PER_SEED, SEED_SD))]


def _score_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(("window_nll_", "per_item_", "window_kl_", "window_top1_"))
            and not c.startswith("per_item_tasks_")
            and not c.endswith(PER_SEED)]


def collapse_duplicate_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, pattern, sparsity label): every numeric column averaged over
    the cell's records, never silently dropped, and what its seeds say: `seeds` (sorted),
    `n_seeds`, per figure `<figure>_sd` (sample SD over seeds; NaN below two) and
    `<figure>_per_seed`, and per score vector (window NLL, per-item correctness)
    `<scores>_per_seed`, the two-level bootstrap's input. `n_records` counts the records: more
    records than seeds (reruns of a seed under other keys) are averaged, without an interval."""
    if frame.empty:
        return frame.assign(n_records=pd.Series(dtype=int), n_seeds=pd.Series(dtype=int))
    if "seed" not in frame.columns:
        frame = frame.assign(seed=0)
    numeric = [c for c in frame.columns if c not in CELL_KEYS and pd.api.types.is_numeric_dtype(frame[c])]
    other = [c for c in frame.columns if c not in CELL_KEYS and c not in numeric]
    grouped = frame.groupby(CELL_KEYS, sort=False, dropna=False)
    collapsed = grouped[numeric].mean() if numeric else grouped.size().to_frame("n_records")[[]]
    if other:
        collapsed = collapsed.join(grouped[other].first())
    collapsed["n_records"] = grouped.size()
    figures, scores = figure_columns(frame), _score_columns(frame)
    extra: dict[str, list] = {c: [] for c in ["seeds", "n_seeds"] + [f + SEED_SD for f in figures]
                              + [f + PER_SEED for f in figures] + [c + PER_SEED for c in scores]}
    for _, group in grouped:
        by_seed = group.assign(seed=group["seed"].fillna(0).astype(int)).sort_values("seed", kind="stable")
        seeds = list(dict.fromkeys(by_seed["seed"].tolist()))
        extra["seeds"].append(seeds)
        extra["n_seeds"].append(len(seeds))
        for f in figures:
            values = [None if pd.isna(v) else float(v)
                      for v in pd.to_numeric(by_seed.groupby("seed", sort=True)[f].mean(), errors="coerce")]
            extra[f + PER_SEED].append(values)
            known = [v for v in values if v is not None]
            extra[f + SEED_SD].append(uncertainty.seed_spread(known)[1] if len(known) > 1 else math.nan)
        firsts = by_seed.groupby("seed", sort=True).first()
        for c in scores:
            extra[c + PER_SEED].append([None if is_missing(v) else v for v in firsts[c]])
    for column, values in extra.items():
        collapsed[column] = pd.Series(values, index=collapsed.index, dtype=object if column != "n_seeds" else int)
    return collapsed.reset_index()
