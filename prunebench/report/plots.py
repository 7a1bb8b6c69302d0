"""Plots from run records: average accuracy and perplexity against sparsity, per-task bars.

Every figure is drawn on its own Figure with an Agg canvas attached inside the function: nothing
touches pyplot or the process-wide backend, so importing this module (or plotting from a
notebook that uses another backend) changes no global state. Files are written atomically.
Accuracies in the input are fractions; the plots show percent.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from prunebench.store.atomic import atomic_path
from prunebench.report.format import (
    DEFAULT_PATTERN,
    DENSE_LABEL,
    dataset_display_name,
    dataset_file_label,
    format_sparsity_label,
    method_display_name,
    method_order,
    model_display_name,
    model_order,
    sparsity_label_order,
    task_display_name,
)
from prunebench.report.frame import (
    PER_SEED,
    SEED_SD,
    average_accuracy,
    collapse_duplicate_cells,
    ok_rows,
    ppl_datasets,
    resolve_tasks,
)
from prunebench.report.paper import PERCENT
from prunebench.sparsity.pattern_registry import nominal_sparsity, pattern_of_record_name

DEFAULT_FORMATS = ("png",)
LINE_FIGURE_SIZE = (5.0, 3.6)
BAR_FIGURE_SIZE = (7.5, 3.6)
DPI = 150
# Perplexities of heavily pruned models span orders of magnitude; past this max / min ratio a
# linear axis squashes the good methods into one line.
LOG_SCALE_RATIO = 10.0
BAR_GROUP_WIDTH = 0.8


def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


IMAGE_SUFFIXES = {".png", ".pdf", ".svg"}


def _target(path: str | os.PathLike, file_format: str) -> Path:
    """`path` with the format's suffix. Appended rather than swapped: model names carry dots
    ("Llama-3.2-1B") that Path.with_suffix would take for a suffix."""
    base = Path(path)
    if base.suffix.lower() in IMAGE_SUFFIXES:
        base = base.with_suffix("")
    return base.parent / f"{base.name}.{file_format}"


def _save(figure, path: str | os.PathLike, formats: Sequence[str]) -> list[Path]:
    written = []
    for file_format in formats:
        target = _target(path, file_format)
        with atomic_path(target) as temporary:
            # The temporary name ends in ".tmp", so the format must be given explicitly.
            figure.savefig(temporary, format=file_format, dpi=DPI)
        written.append(target)
    return written


def _model_rows(df: pd.DataFrame, model: str) -> pd.DataFrame:
    frame = collapse_duplicate_cells(ok_rows(df))
    return frame[frame["model"].astype(str).str.lower() == str(model).lower()]


def _nominal_sparsity(row: pd.Series) -> float:
    """Fraction of weights removed by the row's target: N:M keeps N of every M; a hybrid tile
    pattern's target is its effective sparsity (Pattern.nominal_sparsity)."""
    return nominal_sparsity(str(row["pattern"]), row["sparsity"])


def _fixes_its_target(pattern_name) -> bool:
    """Does the record's pattern fix its own amount (N:M): one point, not a line over targets?"""
    pattern = pattern_of_record_name(str(pattern_name))
    return pattern is not None and pattern.fixed_target


def _plot_against_sparsity(rows: pd.DataFrame, values: pd.Series, ylabel: str, title: str,
                           path: str | os.PathLike, formats: Sequence[str],
                           log_when_spread: bool, sds: pd.Series | None = None) -> list[Path]:
    """`sds`: each value's sample SD over seeds (NaN for one seed), drawn as error bars."""
    figure = _new_figure(LINE_FIGURE_SIZE)
    axes = figure.add_subplot()
    rows = rows.assign(_value=values, _sd=math.nan if sds is None else sds).dropna(subset=["_value"])
    dense = rows[rows["sparsity_label"] == DENSE_LABEL]
    for _, row in dense.iterrows():
        axes.axhline(row["_value"], linestyle="--", color="gray", label="Dense")
    pruned = rows[rows["sparsity_label"] != DENSE_LABEL]
    for method in sorted(pruned["method"].unique(), key=method_order):
        mine = pruned[pruned["method"] == method]
        for pattern in sorted(mine["pattern"].unique(), key=lambda p: (p != DEFAULT_PATTERN, p)):
            rows_of = mine[mine["pattern"] == pattern]
            label = method_display_name(method) + ("" if pattern == DEFAULT_PATTERN else f" ({pattern})")
            if _fixes_its_target(pattern):  # one point per N:M pattern
                for _, row in rows_of.iterrows():
                    axes.errorbar([_nominal_sparsity(row) * PERCENT], [row["_value"]], yerr=_yerr([row["_sd"]]),
                                  marker="s", linestyle="none", capsize=3, label=label)
            else:  # unstructured and dense-or-2:4 tiles: a line over the targets (effective sparsity)
                rows_of = rows_of.sort_values("sparsity")
                axes.errorbar(rows_of["sparsity"] * PERCENT, rows_of["_value"], yerr=_yerr(rows_of["_sd"]),
                              marker="o" if pattern == DEFAULT_PATTERN else "D", capsize=3, label=label)
    positive = rows["_value"][rows["_value"] > 0]
    if log_when_spread and len(positive) and positive.max() / positive.min() > LOG_SCALE_RATIO:
        axes.set_yscale("log")
    if rows["_sd"].notna().any():
        title += " (bars: ±1 SD over seeds)"
    axes.set_xlabel("sparsity (%; effective for dense-or-2:4 tiles)")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    if len(rows):
        axes.legend(fontsize="small")
    return _save(figure, path, formats)


def _yerr(sds) -> list[float] | None:
    """Error-bar half-lengths, 0 where a value has one seed; None when nothing has a spread."""
    values = [0.0 if pd.isna(v) else float(v) for v in sds]
    return values if any(values) else None


def _average_sd(rows: pd.DataFrame, tasks: Sequence[str]) -> pd.Series:
    """Per row: the sample SD over seeds of the average accuracy (%) over `tasks`."""
    def sd(row):
        per_task = [row.get(f"acc_{t}{PER_SEED}") for t in tasks]
        per_task = [v for v in per_task if isinstance(v, list) and v and None not in v]
        if not per_task or len({len(v) for v in per_task}) != 1 or len(per_task[0]) < 2:
            return math.nan
        return float(pd.Series([sum(x) / len(x) for x in zip(*per_task)]).std(ddof=1)) * PERCENT
    return rows.apply(sd, axis=1) if len(rows) else pd.Series(dtype=float)


def plot_accuracy_vs_sparsity(df: pd.DataFrame, model: str, path: str | os.PathLike, *,
                              tasks: Sequence[str] | None = None,
                              formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Average accuracy (%) against sparsity for one model: a line per method, dense dashed.
    Rows without task cells use their published average (paper rows). Returns the files."""
    rows = _model_rows(df, model)
    tasks = resolve_tasks(rows, tasks)
    values = average_accuracy(rows, tasks) * PERCENT
    return _plot_against_sparsity(rows, values, "average accuracy (%)", model_display_name(model), path, formats,
                                  log_when_spread=False, sds=_average_sd(rows, tasks))


def plot_perplexity_vs_sparsity(df: pd.DataFrame, model: str, path: str | os.PathLike, *,
                                dataset: str | None = None,
                                formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Perplexity against sparsity for one model (log axis when values spread widely)."""
    rows = _model_rows(df, model)
    datasets = ppl_datasets(rows)
    dataset = dataset or (datasets[0] if datasets else None)
    column = f"ppl_{dataset}"
    values = rows[column] if column in rows.columns else pd.Series(math.nan, index=rows.index)
    sds = rows[f"{column}{SEED_SD}"] if f"{column}{SEED_SD}" in rows.columns else None
    return _plot_against_sparsity(rows, values.astype(float), f"perplexity ({dataset_display_name(dataset)})",
                                  model_display_name(model), path, formats, log_when_spread=True, sds=sds)


def plot_task_bars(df: pd.DataFrame, model: str, sparsity_label: str, path: str | os.PathLike, *,
                   tasks: Sequence[str] | None = None,
                   formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Per-task accuracy (%) bars for one model at one sparsity: a bar per method (dense
    included), grouped by task, plus the average."""
    rows = _model_rows(df, model)
    rows = rows[(rows["sparsity_label"] == sparsity_label) | (rows["sparsity_label"] == DENSE_LABEL)]
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: method_order(rows["method"].iat[i]))]
    tasks = resolve_tasks(rows, tasks)
    groups = [task_display_name(task) for task in tasks] + ["Avg"]
    averages = average_accuracy(rows, tasks, use_published=False)
    # Rows published as PPL / Avg only have no bars to draw; leaving them out keeps the groups
    # free of empty slots.
    rows, averages = rows[averages.notna()], averages[averages.notna()]
    figure = _new_figure(BAR_FIGURE_SIZE)
    axes = figure.add_subplot()
    width = BAR_GROUP_WIDTH / max(len(rows), 1)
    for position, (index, row) in enumerate(rows.iterrows()):
        heights = [row.get(f"acc_{task}", math.nan) * PERCENT for task in tasks] + [averages[index] * PERCENT]
        offsets = [group + (position - (len(rows) - 1) / 2) * width for group in range(len(groups))]
        axes.bar(offsets, heights, width=width, label=method_display_name(row["method"]))
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{model_display_name(model)}, {format_sparsity_label(sparsity_label)}",
                   fontsize="medium")
    axes.grid(axis="y", alpha=0.3)
    if len(rows):
        axes.legend(fontsize="small")
    return _save(figure, path, formats)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", str(text)).strip("-")


def write_plots(df: pd.DataFrame, out_dir: str | os.PathLike, *,
                tasks: Sequence[str] | None = None,
                formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Every plot for every model in the records, under `out_dir`; returns the files written."""
    frame = collapse_duplicate_cells(ok_rows(df))
    out = Path(out_dir)
    written: list[Path] = []
    for model in sorted(frame["model"].unique(), key=model_order):
        rows = frame[frame["model"] == model]
        name = _slug(model)
        model_tasks = resolve_tasks(rows, tasks)
        has_accuracy = average_accuracy(rows, model_tasks).notna().any()
        if has_accuracy:
            written += plot_accuracy_vs_sparsity(rows, model, out / f"accuracy_vs_sparsity__{name}",
                                                 tasks=tasks, formats=formats)
        for dataset in ppl_datasets(rows):
            written += plot_perplexity_vs_sparsity(
                rows, model, out / f"perplexity_vs_sparsity__{dataset_file_label(dataset)}__{name}", dataset=dataset,
                formats=formats)
        measured = average_accuracy(rows, model_tasks, use_published=False).notna()
        labels = sorted({label for label in rows.loc[measured, "sparsity_label"] if label != DENSE_LABEL},
                        key=sparsity_label_order)
        for label in labels:
            written += plot_task_bars(rows, model, label, out / f"task_accuracy__{name}__{_slug(label)}",
                                      tasks=tasks, formats=formats)
    return written


def plot_heldout_curves(records: Sequence[dict], path: str | os.PathLike, *,
                        formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Held-out perplexity of the current hard mask against training steps, for every record whose
    method stored such a curve (LEAP: method.stats.curves.heldout_step / heldout_ppl).  Step 0 is
    the prior's mask.  Returns [] when no record has a curve."""
    curves = []
    for record in records:
        if record.get("status") != "ok":
            continue
        stats = (record.get("method") or {}).get("stats") or {}
        curve = stats.get("curves") or {}
        steps, ppl = curve.get("heldout_step") or [], curve.get("heldout_ppl") or []
        if steps and len(steps) == len(ppl):
            label = (f"{model_display_name(record['model']['id'])} {method_display_name(record['method']['name'])} "
                     f"{format_sparsity_label(record['sparsity']['label'])}")
            curves.append((label, steps, ppl))
    if not curves:
        return []
    figure = _new_figure(LINE_FIGURE_SIZE)
    axes = figure.add_subplot()
    for label, steps, ppl in sorted(curves):
        axes.plot(steps, ppl, marker="o", label=label)
    axes.set_xlabel("training step (0 = prior mask)")
    axes.set_ylabel("held-out perplexity, hard mask")
    values = [v for _, _, ppl in curves for v in ppl if v and math.isfinite(v)]
    if values and max(values) / max(min(values), 1e-9) > LOG_SCALE_RATIO:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path, formats)


def plot_block_allocation(records: Sequence[dict], out_dir: str | os.PathLike, *,
                          formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Per-block sparsity of every cell with a non-uniform allocation (OWL, AlphaPruning): the
    target the allocation gave each block (line) and the sparsity measured after pruning
    (markers), one figure per model and global target.  Returns [] when no record has one."""
    groups: dict = {}
    for record in records:
        alloc = (record.get("sparsity") or {}).get("allocation")
        if record.get("status") != "ok" or not alloc or not alloc.get("block_targets"):
            continue
        key = (record["model"]["id"], record["sparsity"]["label"])
        groups.setdefault(key, []).append(record)
    written: list[Path] = []
    for (model, label), recs in sorted(groups.items(), key=lambda kv: (model_order(kv[0][0]), sparsity_label_order(kv[0][1]))):
        figure = _new_figure(LINE_FIGURE_SIZE)
        axes = figure.add_subplot()
        for record in sorted(recs, key=lambda r: method_order(r["method"]["name"])):
            alloc = record["sparsity"]["allocation"]
            blocks = list(range(len(alloc["block_targets"])))
            line, = axes.plot(blocks, alloc["block_targets"], label=f"{method_display_name(record['method']['name'])} target")
            if alloc.get("block_achieved"):
                axes.plot(blocks, alloc["block_achieved"], linestyle="none", marker="o", markersize=3,
                          color=line.get_color(), label="achieved")
        target = (recs[0].get("sparsity") or {}).get("target")
        if target is not None and recs[0]["sparsity"].get("pattern") == "unstructured":
            axes.axhline(target, color="grey", linestyle="--", linewidth=1, label="uniform")
        axes.set_xlabel("decoder block")
        axes.set_ylabel("sparsity")
        axes.set_title(f"{model_display_name(model)}, per-block allocation at {format_sparsity_label(label)}", fontsize="medium")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="x-small", ncol=2)
        written += _save(figure, Path(out_dir) / f"block_allocation__{_slug(model)}__{_slug(label)}", formats)
    return written
