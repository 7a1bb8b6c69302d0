"""The perplexity tables: per perplexity text, rows model x method and one column per sparsity
label, each pruned cell with its difference from the model's dense perplexity (and its 95%
interval) where the frame carries per-window scores; stacked for perplexity.csv, and as markdown.
"""
from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate

from prunebench.report.differences import Difference, ppl_difference
from prunebench.report.format import (DENSE_LABEL, DIFFERENCE_CAPTION, DIVERGED, INTERVAL_MARKERS,
                                      dataset_display_name, difference_columns, format_difference, format_number,
                                      format_sd, format_sparsity_label, method_display_name, method_order,
                                      model_display_name, model_order, sparsity_label_order)
from prunebench.report.frame import (SEED_SD, carries_item_scores, cell_value, collapse_duplicate_cells, has_ppl,
                                     is_dense, ok_rows, ppl_cell_value, ppl_datasets, ppl_seqlens)


def perplexity_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per perplexity dataset: rows model x method, one column per sparsity label (dense rows
    repeat their value in every column, as they belong to every block). A diverged cell holds inf
    (printed "diverged")."""
    frame = collapse_duplicate_cells(ok_rows(df))
    tables = {}
    for dataset in ppl_datasets(frame):
        rows = frame[has_ppl(frame, dataset)]
        labels = sorted({label for label in rows["sparsity_label"] if label != DENSE_LABEL},
                        key=sparsity_label_order) or [DENSE_LABEL]
        records = []
        keys = sorted({(row["model"], row["method"]) for _, row in rows.iterrows()},
                      key=lambda key: (model_order(key[0]), method_order(key[1])))
        for model, method in keys:
            mine = rows[(rows["model"] == model) & (rows["method"] == method)]
            record = {"model": model, "method": method}
            for label in labels:
                match = mine if method == "dense" else mine[mine["sparsity_label"] == label]
                record[label] = ppl_cell_value(match.iloc[0], dataset) if len(match) else math.nan
            records.append(record)
        tables[dataset] = pd.DataFrame(records, columns=["model", "method"] + labels)
    return tables


def perplexity_sds(df: pd.DataFrame) -> dict[str, dict[tuple[str, str, str], float]]:
    """Per dataset, (model, method, sparsity label) -> the perplexity's sample SD over seeds, for
    the cells run with two or more seeds."""
    frame = collapse_duplicate_cells(ok_rows(df))
    out: dict[str, dict] = {}
    for dataset in ppl_datasets(frame):
        out[dataset] = {(r["model"], r["method"], r["sparsity_label"]): sd for _, r in frame.iterrows()
                        if (sd := cell_value(r, f"ppl_{dataset}{SEED_SD}")) is not None}
    return out


def perplexity_differences(df: pd.DataFrame) -> dict[str, dict[tuple[str, str, str], Difference]]:
    """Per dataset, (model, method, sparsity label) -> the pruned cell's perplexity minus its
    model's dense perplexity, with the interval (see Difference); only cells with both values."""
    frame = collapse_duplicate_cells(ok_rows(df))
    out: dict[str, dict] = {}
    for dataset in ppl_datasets(frame):
        rows = frame[has_ppl(frame, dataset)]
        dense = {row["model"]: row for _, row in rows[rows["method"] == "dense"].iloc[::-1].iterrows()}
        found = {}
        for _, row in rows.iterrows():
            if is_dense(row) or row["model"] not in dense:
                continue
            difference = ppl_difference(row, dense[row["model"]], dataset)
            if difference is not None:
                found[(row["model"], row["method"], row["sparsity_label"])] = difference
        out[dataset] = found
    return out


def perplexity_long_frame(df: pd.DataFrame) -> pd.DataFrame:
    """perplexity.csv: the perplexity tables stacked (column `dataset`), "diverged" for a diverged
    cell and, for frames with per-window scores, per sparsity label `<label>_diff`, `_lo`, `_hi`,
    `_significant`, `_note` (the difference from the model's dense row)."""
    tables = perplexity_tables(df)
    if not tables:
        return pd.DataFrame(columns=["dataset"])
    differences = perplexity_differences(df) if carries_item_scores(df) else {}
    frames = []
    for name, table in tables.items():
        table = table.copy()
        labels = [c for c in table.columns if c not in ("model", "method")]
        found = differences.get(name)
        sds = perplexity_sds(df).get(name, {})
        if sds:
            for label in labels:
                table[f"{label}{SEED_SD}"] = [sds.get((r["model"], r["method"], label)) for _, r in table.iterrows()]
        if found is not None:
            for label in labels:
                columns = [difference_columns(label, found.get((r["model"], r["method"], label)))
                           for _, r in table.iterrows()]
                for key in (columns[0] if columns else {}):
                    table[key] = [c[key] for c in columns]
        for label in labels:
            table[label] = table[label].map(lambda v: DIVERGED if isinstance(v, float) and math.isinf(v) else v)
        frames.append(table.assign(dataset=name))
    return pd.concat(frames, ignore_index=True)


def render_perplexity_markdown(tables: dict[str, pd.DataFrame], df: pd.DataFrame,
                               heading_level: int = 3) -> str:
    frame = ok_rows(df)
    differences = perplexity_differences(df) if carries_item_scores(df) else {}
    parts = []
    for dataset, table in tables.items():
        seqlens = ppl_seqlens(frame, dataset)
        window = (", ".join(map(str, seqlens)) + "-token windows") if seqlens else "window length not stated"
        parts.append(f"{'#' * heading_level} Perplexity: {dataset_display_name(dataset)} ({window})")
        parts.append("")
        labels = [c for c in table.columns if c not in ("model", "method")]
        found = differences.get(dataset, {})
        sds = perplexity_sds(df).get(dataset, {})

        def cell(r, label):
            text = format_number(r[label]) + format_sd(sds.get((r["model"], r["method"], label)))
            difference = found.get((r["model"], r["method"], label))
            if difference is not None and difference.diff is not None:
                used.update(difference.markers)
                text += " " + format_difference(difference)
            return text

        used: set = set()
        rows = [[model_display_name(r["model"]), method_display_name(r["method"])]
                + [cell(r, label) for label in labels] for _, r in table.iterrows()]
        if dataset in differences:
            parts += [DIFFERENCE_CAPTION.format(what="cells", baseline="the dense model's perplexity"), ""]
        parts.append(tabulate(rows, headers=["Model", "Method"] + [format_sparsity_label(l) for l in labels],
                              tablefmt="github", disable_numparse=True,
                              colalign=["left", "left"] + ["right"] * len(labels)))
        parts.append("")
        notes = [f"- {m.symbol} {m.meaning}." for m in INTERVAL_MARKERS if m in used]
        if notes:
            parts += notes + [""]
    return "\n".join(parts)
