"""Tables from run records: the paper's main-table layout, gains over baselines, perplexity
tables and a per-cell CSV export.

Input: a DataFrame of run records, one row per cell (see prunebench.store.records), or the paper's
reference data (prunebench.report.paper.paper_reference_frame), which uses the same columns.
Accuracies are fractions in every DataFrame this module reads or returns, except the frames that
mirror a rendered table (`layout_frame`, `gain_table`, `summarize_gains`), which hold percent
points as printed. Only rows with status "ok" are tabled. Dense rows belong to every sparsity
block.

Uncertainty: when the frame carries per-window / per-item scores (records_frame always adds the
columns), every difference against a baseline (a pruned cell against the dense cell of its
model, a learned method against a layer-wise one) gets a 95% paired-bootstrap interval
(prunebench.report.uncertainty); cells of records without those scores are marked "no
interval", never dropped. A diverged perplexity prints as "diverged".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from tabulate import tabulate

from prunebench.store.atomic import write_text_atomic
from prunebench.report import chance
from prunebench.report import uncertainty
from prunebench.report.paper import (
    PAPER_BASELINE,
    PAPER_HEADLINE_GAIN,
    PAPER_METHOD,
    PAPER_MODEL_IDS,
    PAPER_PPL_DATASET,
    PAPER_SOURCE,
    PAPER_TASKS,
    PERCENT,
    SIBLING_STUDY_SOURCE,
    THANOS_SWEEP_SOURCE,
    dataset_display_name,
    method_display_name,
    model_display_name,
    paper_reference_frame,
    patch_paper_markdown,
    task_display_name,
)
from prunebench import registry
from prunebench.sparsity.hybrid import LABEL as HYBRID_LABEL
from prunebench.sparsity.pattern_registry import display_label, label_from_record, label_sort_key

# Rows go by the kind each method's class declares in the registry (dense, then layer-wise, then
# learned), then by display name; the report itself lists no method.
KIND_ORDER = ("dense", "layer-wise", "learned", "other")
# BEST_LAYERWISE compares a learned method with the best of the layer-wise methods present in
# each setting; PAPER_BASELINE (from the LEAP paper's headline) with that one method.
BEST_LAYERWISE = "best-layerwise"


def methods_of_kind(kind: str) -> tuple:
    """The registered methods (no allocations) whose class declares `kind`."""
    return tuple(m["name"] for m in registry.describe() if m["kind"] == kind)


def learned_methods() -> tuple:
    return methods_of_kind("learned")


def layerwise_methods() -> tuple:
    return methods_of_kind("layer-wise")

DENSE_LABEL = "dense"
DEFAULT_PATTERN = "unstructured"
DISPLAY_DECIMALS = 2
NOT_AVAILABLE = "-"
# Sparsity targets closer than this are the same target (labels come from floats).
SPARSITY_MATCH_TOLERANCE = 1e-6
# A value printed with two decimals stands for anything within half a unit of its last digit.
PRINTED_HALF_UNIT = 0.5 * 10 ** -DISPLAY_DECIMALS
# A published average computed from unrounded accuracies, then rounded, can differ from the mean
# of the rounded cells by up to one half unit from the cells plus one from its own rounding.
AVG_ROUNDING_SLACK = 2 * PRINTED_HALF_UNIT


@dataclass(frozen=True)
class Marker:
    """A footnote marker: its symbol in markdown / CSV, its LaTeX form and what it means."""
    symbol: str
    latex: str
    meaning: str


AVG_INCONSISTENT = Marker(
    "*", r"$^{*}$",
    "the published Avg cannot come from its printed cells, even allowing for rounding; "
    "the table shows the mean of the cells")
AVG_ROUNDING = Marker(
    "°", r"$^{\circ}$",
    "the published Avg differs from the mean of its printed cells by one unit in the last "
    "digit, within the rounding of the cells; the table shows the mean of the cells")
AVG_PARTIAL = Marker("†", r"$^{\dagger}$", "Avg over the tasks present only")
AVG_PUBLISHED_ONLY = Marker(
    "‡", r"$^{\ddagger}$", "task cells not published; Avg as published")
SIBLING_STUDY = Marker(
    "§", r"$^{\S}$", "row reported by OPTIMA, a sibling study of the same group with the same "
    "dense rows, not by the LEAP paper")
THANOS_SWEEP = Marker(
    "ᵗ", r"$^{\mathrm{t}}$", "Thanos row of the LEAP group's sweep, printed there only as PPL / Avg "
    "(transcribed in shared/BASELINES.md)")
# The publication a reference row comes from, where it is not the paper of the table.
SOURCE_MARKERS = {SIBLING_STUDY_SOURCE: SIBLING_STUDY, THANOS_SWEEP_SOURCE: THANOS_SWEEP}
NOT_SIGNIFICANT = Marker(
    "ⁿˢ", r"$^{\mathrm{ns}}$", "not significant: the 95% paired-bootstrap interval contains zero")
NO_INTERVAL = Marker("¶", r"$^{\P}$", uncertainty.NO_ITEM_DATA)
NOT_COMPARABLE = Marker(
    "≠", r"$^{\neq}$", "no interval: not scored on the same windows / items as its baseline")
EVAL_NOISE_ONLY = Marker(
    "ᵉ", r"$^{\mathrm{e}}$", "evaluation noise only: a side that depends on the calibration seed was run with "
    "one seed, so the seed's noise is not in this interval and no verdict may rest on it")
MARKERS = (AVG_INCONSISTENT, AVG_ROUNDING, AVG_PARTIAL, AVG_PUBLISHED_ONLY, SIBLING_STUDY, THANOS_SWEEP,
           NOT_SIGNIFICANT, NO_INTERVAL, NOT_COMPARABLE, EVAL_NOISE_ONLY)
DIVERGED = "diverged"


# ----------------------------------------------------------------------------- rounding, labels

def round_printed(value: float, decimals: int = DISPLAY_DECIMALS) -> float:
    """Round half up, as a person printing a table would, immune to binary representation noise
    (44.885 stored as 44.88499999 still rounds to 44.89)."""
    denoised = Decimal(f"{value:.9f}")
    return float(denoised.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def format_number(value: float | None, decimals: int = DISPLAY_DECIMALS) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return NOT_AVAILABLE
    if math.isinf(value):  # a diverged model (its record holds no finite perplexity)
        return DIVERGED
    return f"{round_printed(value, decimals):.{decimals}f}"


def format_sparsity_label(label: str) -> str:
    """"0.5" -> "50%", "2:4" -> "2:4", "hybrid:0.35/64" -> "35% tiles/64", "dense" -> "dense": as
    each label's pattern prints it (Pattern.display_label)."""
    return display_label(label)


def sparsity_label_order(label: str) -> tuple:
    """Sort key: dense, then unstructured targets ascending, then N:M patterns, then dense-or-2:4
    tiles by effective sparsity (each pattern's label_rank), then the rest."""
    if label == DENSE_LABEL:
        return (0, 0.0, label)
    return label_sort_key(label)


def method_order(method: str) -> tuple:
    """Kind (from the registry), then display name; a method with an allocation follows it."""
    base, _, allocation = str(method).partition("+")
    kind = registry.method_kind(base)
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), method_display_name(base).lower(),
            allocation)


def model_order(model_id: str) -> tuple:
    """The paper's models in the paper's order, then every other model alphabetically."""
    paper_ids = [model.lower() for model in PAPER_MODEL_IDS.values()]
    if str(model_id).lower() in paper_ids:
        return (paper_ids.index(str(model_id).lower()), "")
    return (len(paper_ids), str(model_id).lower())


# ----------------------------------------------------------------------------- the records frame

def _derive_sparsity_label(row: pd.Series) -> str:
    if row["method"] == "dense":
        return DENSE_LABEL
    return label_from_record(str(row.get("pattern", DEFAULT_PATTERN)), row["sparsity"])


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
    derived = frame.apply(_derive_sparsity_label, axis=1)
    if "sparsity_label" in frame.columns:
        labels = frame["sparsity_label"].astype("object")
        frame["sparsity_label"] = labels.where(labels.notna(), derived).astype(str)
    else:
        frame["sparsity_label"] = derived
    frame.loc[frame["method"] == "dense", "sparsity_label"] = DENSE_LABEL
    return frame.reset_index(drop=True)


def _present(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and frame[column].notna().any()


def accuracy_tasks(df: pd.DataFrame) -> list[str]:
    """Every task with at least one accuracy value: paper tasks in paper order, then the rest."""
    tasks = [column[len("acc_"):] for column in df.columns
             if column.startswith("acc_") and not column.endswith((PER_SEED, SEED_SD)) and _present(df, column)]
    return [task for task in PAPER_TASKS if task in tasks] + sorted(
        task for task in tasks if task not in PAPER_TASKS)


def resolve_tasks(df: pd.DataFrame, tasks: Sequence[str] | None = None) -> list[str]:
    """The accuracy columns of the paper layout: the given tasks; else the paper's six tasks
    whenever any of them was measured (missing ones show as "-"); else every measured task."""
    if tasks is not None:
        return list(tasks)
    measured = accuracy_tasks(df)
    if any(task in PAPER_TASKS for task in measured):
        return list(PAPER_TASKS)
    return measured


def _diverged_mask(df: pd.DataFrame, dataset: str) -> pd.Series:
    """Rows whose perplexity on `dataset` diverged (flagged, or a non-finite value)."""
    mask = pd.Series(False, index=df.index)
    column = f"ppl_{dataset}"
    if column in df.columns:
        values = pd.to_numeric(df[column], errors="coerce")
        mask |= values.isin([math.inf, -math.inf])
    flag = f"diverged_{dataset}"
    if flag in df.columns:
        mask |= df[flag].map(_truthy)
    return mask


def _has_ppl(df: pd.DataFrame, dataset: str) -> pd.Series:
    return df[f"ppl_{dataset}"].notna() | _diverged_mask(df, dataset)


def ppl_datasets(df: pd.DataFrame) -> list[str]:
    """Every perplexity dataset with at least one value (or diverged cell), WikiText-2 (the
    paper's) first."""
    datasets = sorted(
        column[len("ppl_"):] for column in df.columns
        if column.startswith("ppl_") and not column.endswith(("_seqlen", PER_SEED, SEED_SD))
        and _has_ppl(df, column[len("ppl_"):]).any())
    return sorted(datasets, key=lambda name: (name != PAPER_PPL_DATASET, name))


def ppl_seqlens(df: pd.DataFrame, dataset: str) -> list[int]:
    column = f"ppl_{dataset}_seqlen"
    if column not in df.columns:
        return []
    values = df.loc[_has_ppl(df, dataset), column].dropna()
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


CELL_KEYS = ["model", "method", "pattern", "sparsity_label"]
PER_SEED = "_per_seed"   # suffix: a figure's (or a score vector's) values in seed order
SEED_SD = "_sd"          # suffix: a figure's sample SD over seeds


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
            extra[c + PER_SEED].append([None if _missing(v) else v for v in firsts[c]])
    for column, values in extra.items():
        collapsed[column] = pd.Series(values, index=collapsed.index, dtype=object if column != "n_seeds" else int)
    return collapsed.reset_index()


def _is_dense(row: pd.Series) -> bool:
    return row["sparsity_label"] == DENSE_LABEL


def _value(row: pd.Series | None, column: str) -> float | None:
    if row is None or column not in row.index:
        return None
    value = row[column]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _missing(value) -> bool:
    if isinstance(value, (list, tuple, dict)):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _truthy(value) -> bool:
    """A flag cell: True / 1.0 (or a mean > 0 after collapsing duplicates); NaN / None is False."""
    if _missing(value):
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value > 0) if isinstance(value, (int, float)) else bool(value)


def _cell(row: pd.Series | None, column: str):
    """A raw cell (lists, strings), None when absent or missing."""
    if row is None or column not in row.index or _missing(row[column]):
        return None
    return row[column]


def ppl_cell_value(row: pd.Series | None, dataset: str) -> float | None:
    """The perplexity to print: the value, inf for a diverged cell (printed "diverged"), None if
    not measured."""
    value = _value(row, f"ppl_{dataset}")
    if row is not None and (_truthy(_cell(row, f"diverged_{dataset}"))
                            or (value is not None and not math.isfinite(value))):
        return math.inf
    return value


# ----------------------------------------------------------------------------- differences

def carries_item_scores(df: pd.DataFrame) -> bool:
    """Whether the frame has per-window / per-item columns (records_frame adds them for every
    record, None where a record predates them); frames without them (the paper's numbers,
    hand-made frames) get no interval annotations."""
    return any(c.startswith(("window_nll_", "per_item_")) for c in df.columns)


@dataclass(frozen=True)
class Difference:
    """a - b in display units (perplexity, or percent points for accuracies), with its 95%
    paired-bootstrap interval [lo, hi] when one could be computed, else `note` says why."""
    diff: float | None
    lo: float | None = None
    hi: float | None = None
    note: str | None = None
    rel_diff: float | None = None
    rel_lo: float | None = None
    rel_hi: float | None = None
    n: int | None = None
    n_seeds: tuple[int, int] | None = None  # seeds behind each side
    noise: str | None = None  # which noise the interval covers (SEEDS_AND_EVAL, EVAL_ONLY, NO_SEED_NOISE)

    @property
    def significant(self) -> bool | None:
        if self.lo is None or self.hi is None:
            return None
        return self.lo > 0 or self.hi < 0

    @property
    def marker(self) -> Marker | None:
        if self.diff is None:
            return None
        if self.lo is not None:
            return None if self.significant else NOT_SIGNIFICANT
        if self.note and self.note.startswith("not comparable"):
            return NOT_COMPARABLE
        return NO_INTERVAL

    @property
    def markers(self) -> tuple[Marker, ...]:
        """The marker above, then EVAL_NOISE_ONLY for an interval that misses the seed's noise."""
        found = [m for m in (self.marker,) if m is not None]
        if self.lo is not None and self.noise == EVAL_ONLY:
            found.append(EVAL_NOISE_ONLY)
        return tuple(found)


MEAN_OF_RECORDS = "no interval (mean of several records of one seed)"
# What an interval's width covers.
SEEDS_AND_EVAL = "seeds and evaluation"
EVAL_ONLY = "evaluation noise only"         # a seed-dependent side has a single seed
NO_SEED_NOISE = "evaluation (seed-invariant cells)"  # neither side can move with the seed


def _noise(row: pd.Series, base: pd.Series) -> tuple[tuple[int, int], str]:
    counts = (_n_seeds(row), _n_seeds(base))
    dependent = [_truthy(_cell(r, "seed_dependent")) for r in (row, base)]
    if not any(dependent):
        return counts, NO_SEED_NOISE
    if any(d and k < 2 for d, k in zip(dependent, counts)):
        return counts, EVAL_ONLY
    return counts, SEEDS_AND_EVAL


def _n_seeds(row: pd.Series) -> int:
    return int(_value(row, "n_seeds") or 1)


def _per_seed(row: pd.Series, column: str) -> list:
    """A score vector's values per seed (after collapsing), else the row's one vector."""
    values = _cell(row, column + PER_SEED)
    return list(values) if values is not None else [_cell(row, column)]


def _int_cell(row: pd.Series, column: str) -> int | None:
    value = _value(row, column)
    return None if value is None else int(value)


def _ppl_payload(row: pd.Series, dataset: str) -> dict:
    nll = _cell(row, f"window_nll_{dataset}")
    return {"diverged": _truthy(_cell(row, f"diverged_{dataset}")),
            "seqlen": _int_cell(row, f"ppl_{dataset}_seqlen"),
            "n_windows": _int_cell(row, f"n_windows_{dataset}"),
            "window_tokens": _int_cell(row, f"window_tokens_{dataset}"),
            "window_nll": None if nll is None else list(nll),
            "windows_fingerprint": _cell(row, f"windows_fp_{dataset}")}


def _acc_payload(row: pd.Series, task: str) -> dict:
    subtasks = _cell(row, f"per_item_tasks_{task}")
    return {"n": _int_cell(row, f"n_{task}"), "per_item": _cell(row, f"per_item_{task}"),
            "per_item_tasks": None if subtasks is None else [list(x) for x in subtasks]}


def _several_records(*rows: pd.Series) -> bool:
    """More records than seeds: reruns of one seed under other keys, averaged without an interval."""
    return any(int(row.get("n_records", 1) or 1) > _n_seeds(row) for row in rows)


def ppl_difference(row: pd.Series, base: pd.Series, dataset: str) -> Difference | None:
    """Perplexity of `row` minus that of `base` on `dataset`; None when either was not measured."""
    a, b = ppl_cell_value(row, dataset), ppl_cell_value(base, dataset)
    if a is None or b is None:
        return None
    if math.isinf(a) or math.isinf(b):
        return Difference(None, note=DIVERGED)
    if _several_records(row, base):
        return Difference(a - b, note=MEAN_OF_RECORDS)
    pa, pb = _ppl_payloads(row, dataset), _ppl_payloads(base, dataset)
    reason = next(filter(None, (uncertainty.ppl_not_comparable(x, y) for x in pa for y in pb)), None)
    interval = None if reason else uncertainty.bootstrap_ppl_diff_seeds(
        [x["window_nll"] for x in pa], [y["window_nll"] for y in pb], int(pa[0]["window_tokens"]))
    n_seeds, noise = _noise(row, base)
    if interval is None:
        return Difference(a - b, note=reason or "not comparable", n_seeds=n_seeds, noise=noise)
    return Difference(a - b, interval.lo, interval.hi, rel_diff=a / b - 1, rel_lo=interval.rel_lo,
                      rel_hi=interval.rel_hi, n=interval.n, n_seeds=n_seeds, noise=noise)


def _ppl_payloads(row: pd.Series, dataset: str) -> list[dict]:
    """One perplexity payload per seed of the row (the window NLL of each seed)."""
    payload = _ppl_payload(row, dataset)
    return [{**payload, "window_nll": None if nll is None else list(nll)}
            for nll in _per_seed(row, f"window_nll_{dataset}")]


def avg_acc_difference(row: pd.Series, base: pd.Series, tasks: Sequence[str]) -> Difference | None:
    """Mean over the tasks both rows measured of acc(row) - acc(base), in percent points, with
    the interval from resampling items within each task; None when no task is shared."""
    common = [t for t in tasks if _value(row, f"acc_{t}") is not None and _value(base, f"acc_{t}") is not None]
    if not common:
        return None
    point = sum(_value(row, f"acc_{t}") - _value(base, f"acc_{t}") for t in common) / len(common) * PERCENT
    if _several_records(row, base):
        return Difference(point, note=MEAN_OF_RECORDS)
    per_task = [(_acc_payloads(row, t), _acc_payloads(base, t)) for t in common]
    reasons = [uncertainty.acc_not_comparable(a, b) for sa, sb in per_task for a in sa for b in sb]
    reason = next((r for r in reasons if r and r.startswith("not comparable")), None) or \
        next((r for r in reasons if r), None)
    interval = None if reason else uncertainty.bootstrap_mean_acc_diff_seeds(
        [([a["per_item"] for a in sa], [b["per_item"] for b in sb]) for sa, sb in per_task])
    n_seeds, noise = _noise(row, base)
    if interval is None:
        return Difference(point, note=reason or "not comparable", n_seeds=n_seeds, noise=noise)
    return Difference(point, interval.lo * PERCENT, interval.hi * PERCENT, n=interval.n, n_seeds=n_seeds,
                      noise=noise)


def _acc_payloads(row: pd.Series, task: str) -> list[dict]:
    """One zero-shot payload per seed of the row (the per-item correctness of each seed)."""
    payload = _acc_payload(row, task)
    return [{**payload, "per_item": items} for items in _per_seed(row, f"per_item_{task}")]


def acc_difference(row: pd.Series, base: pd.Series, task: str) -> Difference | None:
    """acc(row) - acc(base) on one task, in percent points."""
    return avg_acc_difference(row, base, [task])


def format_sd(sd: float | None, latex: bool = False) -> str:
    """" ± 0.42" after a mean over seeds (its sample SD); "" for one seed."""
    if sd is None or _missing(sd) or not math.isfinite(sd):
        return ""
    return (r" $\pm$ " if latex else " ± ") + format_number(sd)


def format_difference(difference: Difference | None, latex: bool = False) -> str:
    """"+14.64 [12.10, 17.30]", with the not-significant / no-interval marker; "" for none."""
    if difference is None or difference.diff is None:
        return ""
    text = _signed(difference.diff)
    if difference.lo is not None:
        text += f" [{format_number(difference.lo)}, {format_number(difference.hi)}]"
    text += "".join(m.latex if latex else m.symbol for m in difference.markers)
    return text


# ----------------------------------------------------------------------------- paper references

class PaperIndex:
    """Looks up the published row with the same model, method and sparsity as a record."""

    def __init__(self, reference: pd.DataFrame):
        self._rows: dict[tuple[str, str], list[pd.Series]] = {}
        for _, row in ok_rows(reference).iterrows():
            key = (str(row["model"]).lower(), row["method"])
            self._rows.setdefault(key, []).append(row)

    def match(self, row: pd.Series) -> pd.Series | None:
        candidates = self._rows.get((str(row["model"]).lower(), row["method"]), [])
        for candidate in candidates:
            if _is_dense(row) and _is_dense(candidate):
                return candidate
            same_pattern = row["pattern"] == candidate["pattern"]
            target, published = _value(row, "sparsity"), _value(candidate, "sparsity")
            if (not _is_dense(row) and same_pattern and target is not None and published is not None
                    and abs(target - published) < SPARSITY_MATCH_TOLERANCE):
                return candidate
        return None


# ----------------------------------------------------------------------------- the paper layout

@dataclass
class TableCell:
    """One printed number, in display units (percent points for accuracies), with the paper's
    value at the same model / method / sparsity when there is one."""
    value: float | None
    paper: float | None = None
    markers: tuple[Marker, ...] = ()
    difference: Difference | None = None   # against the dense row of the same model
    sd: float | None = None                # sample SD over seeds (two or more seeds)


@dataclass
class TableRow:
    model_id: str
    method: str
    sparsity_label: str
    source: str | None
    method_markers: tuple[Marker, ...]
    cells: dict[str, TableCell]
    n_records: int = 1
    n_seeds: int = 1

    @property
    def model(self) -> str:
        return model_display_name(self.model_id)

    @property
    def method_name(self) -> str:
        return method_display_name(self.method)


@dataclass
class TableBlock:
    sparsity_label: str
    rows: list[TableRow]

    @property
    def title(self) -> str:
        if self.sparsity_label == DENSE_LABEL:
            return "Dense models"
        return f"{format_sparsity_label(self.sparsity_label)} sparsity"


@dataclass
class Footnote:
    marker: Marker | None
    text: str


@dataclass
class PaperLayout:
    """The paper's main table: blocks of rows (model x method) per sparsity, columns PPL, tasks,
    Avg, plus footnotes. Built by `paper_layout`, rendered by `render_markdown`, `render_latex`
    and `layout_frame`."""
    blocks: list[TableBlock]
    columns: list[str]
    tasks: list[str]
    ppl_dataset: str | None
    ppl_seqlens: list[int]
    with_paper: bool
    footnotes: list[Footnote] = field(default_factory=list)
    with_differences: bool = False

    def flagged_rows(self, marker: Marker = AVG_INCONSISTENT) -> list[TableRow]:
        """Rows whose Avg carries `marker`, each once (dense rows repeat across blocks)."""
        seen, flagged = set(), []
        for block in self.blocks:
            for row in block.rows:
                key = (row.model_id, row.method, row.sparsity_label)
                if marker in row.cells["Avg"].markers and key not in seen:
                    seen.add(key)
                    flagged.append(row)
        return flagged


PPL_COLUMN = "PPL"
AVG_COLUMN = "Avg"


def _average_cell(row: pd.Series, tasks: list[str], paper_row: pd.Series | None,
                  notes: list[Footnote], row_name: str) -> TableCell:
    values = [_value(row, f"acc_{task}") for task in tasks]
    present = [value * PERCENT for value in values if value is not None]
    published = _value(row, "published_avg")
    published = None if published is None else published * PERCENT
    paper_avg = _value(paper_row, "published_avg")
    paper_avg = None if paper_avg is None else paper_avg * PERCENT

    if not present:
        if published is None:
            return TableCell(None, paper_avg)
        return TableCell(published, paper_avg, (AVG_PUBLISHED_ONLY,))
    mean = sum(present) / len(present)
    if len(present) < len(tasks):
        notes.append(Footnote(AVG_PARTIAL, f"{row_name}: Avg over {len(present)} of "
                                           f"{len(tasks)} tasks."))
        return TableCell(mean, paper_avg, (AVG_PARTIAL,))
    if published is None:
        return TableCell(mean, paper_avg)
    # Compare as printed: two decimals each side.
    printed_difference = abs(round_printed(mean) - round_printed(published))
    if printed_difference <= PRINTED_HALF_UNIT:
        return TableCell(mean, paper_avg)
    marker = AVG_INCONSISTENT if abs(mean - published) > AVG_ROUNDING_SLACK else AVG_ROUNDING
    notes.append(Footnote(marker, f"{row_name}: published Avg {format_number(published)}, "
                                  f"mean of its {len(tasks)} cells {format_number(mean)}."))
    return TableCell(mean, paper_avg, (marker,))


def _table_row(row: pd.Series, tasks: list[str], ppl_dataset: str | None,
               paper_row: pd.Series | None, notes: list[Footnote],
               dense_row: pd.Series | None = None) -> TableRow:
    label = format_sparsity_label(row["sparsity_label"])
    row_name = f"{model_display_name(row['model'])} {method_display_name(row['method'])}, {label}"
    cells: dict[str, TableCell] = {}
    # Differences against the model's dense row, only for pruned rows of frames with item scores.
    compare = dense_row is not None and not _is_dense(row)
    if ppl_dataset is not None:
        # The paper's perplexities are WikiText-2 ones; any other dataset has no paper value.
        paper_ppl = _value(paper_row, f"ppl_{ppl_dataset}") if ppl_dataset == PAPER_PPL_DATASET else None
        cells[PPL_COLUMN] = TableCell(ppl_cell_value(row, ppl_dataset), paper_ppl,
                                      difference=ppl_difference(row, dense_row, ppl_dataset) if compare else None,
                                      sd=_value(row, f"ppl_{ppl_dataset}{SEED_SD}"))
    for task in tasks:
        value = _value(row, f"acc_{task}")
        paper_value = _value(paper_row, f"acc_{task}")
        sd = _value(row, f"acc_{task}{SEED_SD}")
        cells[task_display_name(task)] = TableCell(
            None if value is None else value * PERCENT,
            None if paper_value is None else paper_value * PERCENT, sd=None if sd is None else sd * PERCENT)
    cells[AVG_COLUMN] = _average_cell(row, tasks, paper_row, notes, row_name)
    if compare:
        cells[AVG_COLUMN].difference = avg_acc_difference(row, dense_row, tasks)
    source = row.get("source") if isinstance(row.get("source"), str) else None
    method_markers = (SOURCE_MARKERS[source],) if source in SOURCE_MARKERS else ()
    return TableRow(row["model"], row["method"], row["sparsity_label"], source, method_markers,
                    cells, int(row.get("n_records", 1)), _n_seeds(row))


def _row_sort_key(row: pd.Series) -> tuple:
    return (model_order(row["model"]), method_order(row["method"]))


def _dedupe_notes(notes: Iterable[Footnote]) -> list[Footnote]:
    seen, unique = set(), []
    for note in notes:
        key = (note.marker, note.text)
        if key not in seen:
            seen.add(key)
            unique.append(note)
    return unique


def paper_layout(df: pd.DataFrame, tasks: Sequence[str] | None = None,
                 ppl_dataset: str | None = None,
                 reference: pd.DataFrame | None = None) -> PaperLayout:
    """Arrange records as the paper's main table.

    One block per sparsity label (dense rows repeated in every block), rows ordered by model and
    then `method_order`, columns PPL (`ppl_dataset`, default WikiText-2 when measured), the tasks
    (default: the paper's six) and Avg, the plain mean of the task cells. With `reference` (the
    paper's data), every cell also carries the published value of the same model, method and
    sparsity.
    """
    frame = collapse_duplicate_cells(ok_rows(df))
    tasks = resolve_tasks(frame, tasks)
    datasets = ppl_datasets(frame)
    if ppl_dataset is None:
        ppl_dataset = datasets[0] if datasets else None
    columns = ([PPL_COLUMN] if ppl_dataset else []) + [task_display_name(t) for t in tasks] + [AVG_COLUMN]
    index = PaperIndex(reference) if reference is not None else None
    notes: list[Footnote] = []

    ordered = frame.iloc[sorted(range(len(frame)), key=lambda i: _row_sort_key(frame.iloc[i]))] \
        if not frame.empty else frame
    dense = [row for _, row in ordered.iterrows() if _is_dense(row)]
    labels = sorted({row["sparsity_label"] for _, row in ordered.iterrows() if not _is_dense(row)},
                    key=sparsity_label_order) or ([DENSE_LABEL] if dense else [])

    with_differences = carries_item_scores(frame)
    dense_of = {}
    for row in dense:
        dense_of.setdefault(row["model"], row)
    blocks = []
    for label in labels:
        block_rows = dense + [row for _, row in ordered.iterrows() if row["sparsity_label"] == label
                              and not _is_dense(row)]
        block_rows.sort(key=_row_sort_key)
        rows = [_table_row(row, tasks, ppl_dataset, index.match(row) if index else None, notes,
                           dense_of.get(row["model"]) if with_differences else None)
                for row in block_rows]
        blocks.append(TableBlock(label, rows))

    for block in blocks:
        for row in block.rows:
            if row.n_records > row.n_seeds:
                notes.append(Footnote(None, f"{row.model} {row.method_name}, "
                                            f"{format_sparsity_label(row.sparsity_label)}: mean of "
                                            f"{row.n_records} records of {row.n_seeds} seed(s)."))
    for marker in SOURCE_MARKERS.values():
        if any(marker in row.method_markers for block in blocks for row in block.rows):
            notes.append(Footnote(marker, marker.meaning + "."))
    if any(AVG_PUBLISHED_ONLY in row.cells[AVG_COLUMN].markers for block in blocks for row in block.rows):
        notes.append(Footnote(AVG_PUBLISHED_ONLY, AVG_PUBLISHED_ONLY.meaning + "."))
    for marker in (AVG_INCONSISTENT, AVG_ROUNDING):
        if any(note.marker is marker for note in notes):
            notes.insert(0, Footnote(marker, marker.meaning + ":"))
    used = {m for block in blocks for row in block.rows
            for cell in row.cells.values() if cell.difference is not None for m in cell.difference.markers}
    notes += [Footnote(marker, marker.meaning + ".") for marker in INTERVAL_MARKERS if marker in used]
    notes.sort(key=lambda note: MARKERS.index(note.marker) if note.marker in MARKERS else len(MARKERS))

    seqlens = ppl_seqlens(frame, ppl_dataset) if ppl_dataset else []
    return PaperLayout(blocks, columns, tasks, ppl_dataset, seqlens, index is not None,
                       _dedupe_notes(notes), with_differences)


INTERVAL_MARKERS = (NOT_SIGNIFICANT, NO_INTERVAL, NOT_COMPARABLE, EVAL_NOISE_ONLY)


def _format_cell(cell: TableCell, with_paper: bool, latex: bool = False) -> str:
    text = format_number(cell.value) + format_sd(cell.sd, latex)
    text += "".join(marker.latex if latex else marker.symbol for marker in cell.markers)
    if with_paper and cell.paper is not None:
        text += f" ({format_number(cell.paper)})"
    if cell.difference is not None and cell.difference.diff is not None:
        text += " " + format_difference(cell.difference, latex)
    return text


def _ppl_description(layout: PaperLayout) -> str:
    if layout.ppl_dataset is None:
        return "no perplexity measured"
    window = (", ".join(str(length) for length in layout.ppl_seqlens) + "-token windows"
              if layout.ppl_seqlens else "window length not stated")
    return f"PPL: {dataset_display_name(layout.ppl_dataset)} ({window})"


def layout_caption(layout: PaperLayout) -> str:
    caption = f"{_ppl_description(layout)}; accuracies in percent; Avg = plain mean of the task cells."
    if layout.with_paper:
        caption += " Cells read ours (paper) where the paper published the same model, method and sparsity"
        if layout.ppl_dataset != PAPER_PPL_DATASET:
            caption += f" (paper perplexities are {PAPER_PPL_DATASET}, so PPL has none here)"
        caption += "."
    seeds = sorted({row.n_seeds for block in layout.blocks for row in block.rows if row.n_seeds > 1})
    if seeds:
        caption += f" {SEEDS_CAPTION.format(n='/'.join(map(str, seeds)))}"
    if layout.with_differences:
        caption += (" " + DIFFERENCE_CAPTION.format(what="PPL and Avg cells", baseline="the dense row of the same model"))
    return caption


DIFFERENCE_CAPTION = (f"Pruned {{what}} add the difference from {{baseline}} with its 95% bootstrap "
                      f"interval [lo, hi] ({uncertainty.N_RESAMPLES} resamples: the seeds of each side, then the "
                      f"shared windows / items; Avg: items resampled within each task).")
SEEDS_CAPTION = ("Cells that depend on the calibration seed show the mean ± sample SD over their {n} seeds "
                 "(seed-invariant cells, such as dense and magnitude, run once).")


def _footnote_line(note: Footnote, latex: bool = False) -> str:
    if note.marker is None:
        return note.text
    symbol = note.marker.latex if latex else note.marker.symbol
    return f"{symbol} {note.text}"


def _block_rows(block: TableBlock, layout: PaperLayout, latex: bool = False) -> list[list[str]]:
    escape = _latex_escape if latex else (lambda text: text)
    rows = []
    for row in block.rows:
        method = escape(row.method_name) + "".join(
            marker.latex if latex else marker.symbol for marker in row.method_markers)
        rows.append([escape(row.model), method] + [
            _format_cell(row.cells[column], layout.with_paper, latex) for column in layout.columns])
    return rows


def render_markdown(layout: PaperLayout, heading_level: int = 3) -> str:
    """The layout as github markdown: one table per sparsity block, then the footnotes."""
    headers = ["Model", "Method"] + layout.columns
    parts = [layout_caption(layout), ""]
    for block in layout.blocks:
        parts.append(f"{'#' * heading_level} {block.title}")
        parts.append("")
        parts.append(tabulate(_block_rows(block, layout), headers=headers, tablefmt="github",
                              disable_numparse=True,
                              colalign=["left", "left"] + ["right"] * len(layout.columns)))
        parts.append("")
    if not layout.blocks:
        parts.append("No ok records to table.")
        parts.append("")
    for note in layout.footnotes:
        parts.append(f"- {_footnote_line(note)}")
    return "\n".join(parts).rstrip() + "\n"


_LATEX_SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                   "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "\\": r"\textbackslash{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(character, character) for character in str(text))


def render_latex(layout: PaperLayout) -> str:
    """The layout as one booktabs table, sparsity blocks separated by a spanning header."""
    n_columns = 2 + len(layout.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_latex_escape(layout_caption(layout))}}}",
             r"\begin{tabular}{ll" + "r" * len(layout.columns) + "}", r"\toprule",
             " & ".join(["Model", "Method"] + [_latex_escape(c) for c in layout.columns]) + r" \\"]
    for block in layout.blocks:
        lines.append(r"\midrule")
        lines.append(rf"\multicolumn{{{n_columns}}}{{c}}{{{_latex_escape(block.title)}}} \\")
        lines.append(r"\midrule")
        for cells in _block_rows(block, layout, latex=True):
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in layout.footnotes:
        lines.append(r"\par\footnotesize " + _latex_escape_footnote(note))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _latex_escape_footnote(note: Footnote) -> str:
    text = _latex_escape(note.text)
    return f"{note.marker.latex} {text}" if note.marker else text


def _csv_number(value: float | None):
    """As printed: rounded, "diverged" for a diverged perplexity, None when missing."""
    if value is None:
        return None
    return DIVERGED if math.isinf(value) else round_printed(value)


def _difference_columns(prefix: str, difference: Difference | None) -> dict:
    d = difference
    rounded = lambda v: None if v is None else round_printed(v)  # noqa: E731
    return {f"{prefix}_diff": rounded(d.diff) if d else None, f"{prefix}_lo": rounded(d.lo) if d else None,
            f"{prefix}_hi": rounded(d.hi) if d else None,
            f"{prefix}_significant": d.significant if d else None, f"{prefix}_note": d.note if d else None}


def layout_frame(layout: PaperLayout) -> pd.DataFrame:
    """The layout as a flat table for CSV: one row per printed row, values rounded as printed
    (percent points for accuracies), markers in `avg_flags` / `method_flags`, and `paper_<column>`
    beside every column when the layout carries paper values."""
    records = []
    for block in layout.blocks:
        for row in block.rows:
            record = {"sparsity_label": block.sparsity_label, "model": row.model_id,
                      "model_name": row.model, "method": row.method, "source": row.source}
            for column in layout.columns:
                cell = row.cells[column]
                record[column] = _csv_number(cell.value)
                if layout.with_paper:
                    record[f"paper_{column}"] = None if cell.paper is None else round_printed(cell.paper)
                if layout.with_differences and column in (PPL_COLUMN, AVG_COLUMN):
                    record.update(_difference_columns(column, cell.difference))
            record["avg_flags"] = "".join(m.symbol for m in row.cells[AVG_COLUMN].markers)
            record["method_flags"] = "".join(m.symbol for m in row.method_markers)
            records.append(record)
    return pd.DataFrame(records)


# ----------------------------------------------------------------------------- gains

def _baseline_methods(baseline: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(baseline, str):
        return layerwise_methods() if baseline == BEST_LAYERWISE else (baseline,)
    return tuple(baseline)


def _baseline_name(baseline: str | Sequence[str]) -> str:
    if isinstance(baseline, str):
        return "best layer-wise baseline" if baseline == BEST_LAYERWISE else method_display_name(baseline)
    return "best of " + ", ".join(method_display_name(m) for m in baseline)


def _comparable_averages(learned: pd.Series, baseline: pd.Series, tasks: list[str],
                         prefer_published_avg: bool) -> tuple[float, float, str] | None:
    """Both rows' averages over the same footing (fractions), and what that footing is."""
    learned_published, baseline_published = (_value(learned, "published_avg"),
                                             _value(baseline, "published_avg"))
    both_published = learned_published is not None and baseline_published is not None
    if prefer_published_avg and both_published:
        return learned_published, baseline_published, "published Avg"
    common = [task for task in tasks if _value(learned, f"acc_{task}") is not None
              and _value(baseline, f"acc_{task}") is not None]
    if common:
        learned_mean = sum(_value(learned, f"acc_{t}") for t in common) / len(common)
        baseline_mean = sum(_value(baseline, f"acc_{t}") for t in common) / len(common)
        return learned_mean, baseline_mean, f"mean of {len(common)} tasks"
    if both_published:
        return learned_published, baseline_published, "published Avg"
    return None


def gain_table(df: pd.DataFrame, learned_methods: Sequence[str] | None = None,
               baseline: str | Sequence[str] = PAPER_BASELINE, tasks: Sequence[str] | None = None,
               prefer_published_avg: bool = True) -> pd.DataFrame:
    """Average-accuracy gain of each learned method over a baseline, per model and sparsity.

    `baseline`: a method name (default "admm", the paper's headline comparison), BEST_LAYERWISE
    (the best of the layer-wise methods present in each setting) or a list of methods (their
    best).  `learned_methods`: the methods compared (default: every method of kind "learned").
    Averages are compared on one footing: the published averages when both rows have one and
    `prefer_published_avg` (that is how the paper computed its headline), else the mean over the
    tasks both rows measured. Returns percent points: columns method, model, model_name,
    sparsity_label, pattern, avg, baseline, baseline_avg, gain, basis, and the gain's 95%
    paired-bootstrap interval gain_lo, gain_hi (items resampled within each task, averaged over
    the tasks as the gain is), significant (None without an interval) and interval_note (why
    there is none).
    """
    frame = collapse_duplicate_cells(ok_rows(df))
    tasks = resolve_tasks(frame, tasks)
    candidates = _baseline_methods(baseline)
    compared = globals()["learned_methods"]() if learned_methods is None else tuple(learned_methods)
    records = []
    for _, learned in frame[frame["method"].isin(compared)].iterrows():
        if _is_dense(learned):
            continue
        same_setting = frame[(frame["model"] == learned["model"])
                             & (frame["pattern"] == learned["pattern"])
                             & (frame["sparsity_label"] == learned["sparsity_label"])
                             & (frame["method"].isin(candidates))]
        best = None
        for _, base in same_setting.iterrows():
            averages = _comparable_averages(learned, base, tasks, prefer_published_avg)
            if averages is not None and (best is None or averages[1] > best[1][1]):
                best = (base, averages)
        if best is None:
            continue
        base, (learned_avg, baseline_avg, basis) = best
        gain = (learned_avg - baseline_avg) * PERCENT
        difference = (avg_acc_difference(learned, base, tasks) if basis != "published Avg"
                      else Difference(gain, note="no interval (published averages)"))
        if difference is None:
            difference = Difference(gain, note=uncertainty.NO_ITEM_DATA)
        records.append({
            "method": learned["method"], "model": learned["model"],
            "model_name": model_display_name(learned["model"]),
            "sparsity_label": learned["sparsity_label"], "pattern": learned["pattern"],
            "avg": learned_avg * PERCENT, "baseline": base["method"],
            "baseline_avg": baseline_avg * PERCENT,
            "gain": gain, "basis": basis,
            "gain_lo": difference.lo, "gain_hi": difference.hi,
            "significant": difference.significant, "interval_note": difference.note,
        })
    columns = ["method", "model", "model_name", "sparsity_label", "pattern", "avg", "baseline",
               "baseline_avg", "gain", "basis", "gain_lo", "gain_hi", "significant", "interval_note"]
    gains = pd.DataFrame(records, columns=columns)
    if gains.empty:
        return gains
    order = sorted(range(len(gains)), key=lambda i: (
        method_order(gains["method"].iat[i]), sparsity_label_order(gains["sparsity_label"].iat[i]),
        model_order(gains["model"].iat[i])))
    return gains.iloc[order].reset_index(drop=True)


ALL_SETTINGS = "all"


def summarize_gains(gains: pd.DataFrame) -> pd.DataFrame:
    """Mean gain per learned method, per sparsity label and over all settings ("all")."""
    records = []
    for method in sorted(gains["method"].unique(), key=method_order):
        mine = gains[gains["method"] == method]
        for label in sorted(mine["sparsity_label"].unique(), key=sparsity_label_order):
            subset = mine[mine["sparsity_label"] == label]
            records.append({"method": method, "sparsity_label": label,
                            "n_settings": len(subset), "mean_gain": subset["gain"].mean()})
        records.append({"method": method, "sparsity_label": ALL_SETTINGS,
                        "n_settings": len(mine), "mean_gain": mine["gain"].mean()})
    return pd.DataFrame(records, columns=["method", "sparsity_label", "n_settings", "mean_gain"])


def _signed(value: float) -> str:
    return f"{round_printed(value):+.{DISPLAY_DECIMALS}f}"


def _gain_difference(row) -> Difference:
    lo, hi = getattr(row, "gain_lo", None), getattr(row, "gain_hi", None)
    note = getattr(row, "interval_note", None)
    if _missing(lo) or _missing(hi):
        lo = hi = None
    return Difference(row.gain, lo, hi, note=None if _missing(note) else note)


def _gain_interval(row, latex: bool = False) -> str:
    """The 95% interval of a gain, "[lo, hi]" with the not-significant mark, or the
    no-interval mark alone."""
    d = _gain_difference(row)
    marker = d.marker
    mark = "" if marker is None else (marker.latex if latex else marker.symbol)
    if d.lo is None:
        return mark
    return f"[{format_number(d.lo)}, {format_number(d.hi)}]{mark}"


def _gain_markers(gains: pd.DataFrame) -> list[Marker]:
    used = {_gain_difference(row).marker for row in gains.itertuples()}
    return [marker for marker in INTERVAL_MARKERS if marker in used]


def render_gains_latex(gains: pd.DataFrame, baseline: str | Sequence[str] = PAPER_BASELINE) -> str:
    """The per-setting gains as a booktabs table, each with its 95% interval; not-significant
    gains (the interval contains zero) carry the ns mark."""
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_latex_escape(f'Average-accuracy gain over {_baseline_name(baseline)} (points), with 95% paired-bootstrap intervals.')}}}",
             r"\begin{tabular}{lllrlrrrl}", r"\toprule",
             r"Model & Sparsity & Method & Avg & Baseline & Baseline Avg & Gain & 95\% CI & Basis \\", r"\midrule"]
    for row in gains.itertuples():
        cells = [row.model_name, format_sparsity_label(row.sparsity_label), method_display_name(row.method),
                 format_number(row.avg), method_display_name(row.baseline), format_number(row.baseline_avg),
                 _signed(row.gain)]
        lines.append(" & ".join([_latex_escape(c) for c in cells] + [_gain_interval(row, latex=True),
                                                                      _latex_escape(row.basis)]) + r" \\")
    if gains.empty:
        lines.append(r"\multicolumn{9}{c}{no setting has both methods} \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for marker in _gain_markers(gains):
        lines.append(r"\par\footnotesize " + f"{marker.latex} {_latex_escape(marker.meaning)}.")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def render_gains_markdown(gains: pd.DataFrame, baseline: str | Sequence[str] = PAPER_BASELINE,
                          published_headline: dict[str, float] | None = None,
                          learned_methods: Sequence[str] | None = None) -> str:
    """The per-setting gains and one summary line per learned method (percent points)."""
    if gains.empty:
        learned = " or ".join(method_display_name(method) for method in
                              (globals()["learned_methods"]() if learned_methods is None else learned_methods))
        return f"No setting has results for both {learned} and {_baseline_name(baseline)}.\n"
    rows = [[row.model_name, format_sparsity_label(row.sparsity_label),
             method_display_name(row.method), format_number(row.avg),
             method_display_name(row.baseline), format_number(row.baseline_avg), _signed(row.gain),
             _gain_interval(row), row.basis] for row in gains.itertuples()]
    headers = ["Model", "Sparsity", "Method", "Avg", "Baseline", "Baseline Avg", "Gain", "95% CI", "Basis"]
    parts = [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                      colalign=["left", "left", "left", "right", "left", "right", "right", "right", "left"]),
             ""]
    parts += [f"- {marker.symbol} {marker.meaning}." for marker in _gain_markers(gains)]
    if parts[-1]:
        parts.append("")
    summary = summarize_gains(gains)
    for method in summary["method"].unique():
        mine = summary[summary["method"] == method].set_index("sparsity_label")
        overall = mine.loc[ALL_SETTINGS]
        per_label = ", ".join(f"{_signed(mine.loc[label, 'mean_gain'])} at {format_sparsity_label(label)}"
                              for label in mine.index if label != ALL_SETTINGS)
        line = (f"{method_display_name(method)} minus {_baseline_name(baseline)}: mean "
                f"{_signed(overall['mean_gain'])} points over {int(overall['n_settings'])} "
                f"(model, sparsity) settings ({per_label}).")
        parts.append(line)
    if published_headline:
        per_label = ", ".join(f"{_signed(value)} at {format_sparsity_label(label)}"
                              for label, value in published_headline.items() if label != ALL_SETTINGS)
        parts.append(f"Published headline: {_signed(published_headline[ALL_SETTINGS])} "
                     f"({per_label}).")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- perplexity, cells

def perplexity_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per perplexity dataset: rows model x method, one column per sparsity label (dense rows
    repeat their value in every column, as they belong to every block). A diverged cell holds inf
    (printed "diverged")."""
    frame = collapse_duplicate_cells(ok_rows(df))
    tables = {}
    for dataset in ppl_datasets(frame):
        column = f"ppl_{dataset}"
        rows = frame[_has_ppl(frame, dataset)]
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
                        if (sd := _value(r, f"ppl_{dataset}{SEED_SD}")) is not None}
    return out


def perplexity_differences(df: pd.DataFrame) -> dict[str, dict[tuple[str, str, str], Difference]]:
    """Per dataset, (model, method, sparsity label) -> the pruned cell's perplexity minus its
    model's dense perplexity, with the interval (see Difference); only cells with both values."""
    frame = collapse_duplicate_cells(ok_rows(df))
    out: dict[str, dict] = {}
    for dataset in ppl_datasets(frame):
        rows = frame[_has_ppl(frame, dataset)]
        dense = {row["model"]: row for _, row in rows[rows["method"] == "dense"].iloc[::-1].iterrows()}
        found = {}
        for _, row in rows.iterrows():
            if _is_dense(row) or row["model"] not in dense:
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
                columns = [_difference_columns(label, found.get((r["model"], r["method"], label)))
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
            frame[f"diverged_{dataset}"] = _diverged_mask(frame, dataset)
            ppl_columns.append(f"diverged_{dataset}")
    tasks = accuracy_tasks(frame)
    acc_columns = [f"acc_{task}" for task in tasks]
    stderr_columns = [f"stderr_{task}" for task in tasks if f"stderr_{task}" in frame.columns]
    paper_columns = [f"acc_{task}" for task in PAPER_TASKS if f"acc_{task}" in acc_columns]
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


def _csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def cells_csv_text(df: pd.DataFrame) -> str:
    """cells.csv: `cells_frame` with "diverged" in the perplexity of every diverged cell."""
    frame = cells_frame(df)
    for dataset in ppl_datasets(frame):
        mask = _diverged_mask(frame, dataset)
        if mask.any():
            column = frame[f"ppl_{dataset}"].astype(object)
            column[mask] = DIVERGED
            frame[f"ppl_{dataset}"] = column
    return _csv_text(frame)


def write_cells_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    return write_text_atomic(path, cells_csv_text(df))


# ----------------------------------------------------------------------------- comparisons

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
        if _is_dense(row):
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
        n_seeds = d.n_seeds or (_n_seeds(row), _n_seeds(base))
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
        a, b = _value(row, f"acc_{task}"), _value(base, f"acc_{task}")
        add(f"acc_{task}", "points", None if a is None else a * PERCENT, None if b is None else b * PERCENT,
            acc_difference(row, base, task))
    from .dense_relative import METRICS, differences

    for dataset in datasets:
        for metric, (a, b, d) in differences(row, base, dataset).items():
            add(f"{METRICS[metric][0]}{dataset}", METRICS[metric][1], a, b, d)
    common = [t for t in avg_tasks if _value(row, f"acc_{t}") is not None and _value(base, f"acc_{t}") is not None]
    if common:
        add("avg_acc", "points", sum(_value(row, f"acc_{t}") for t in common) / len(common) * PERCENT,
            sum(_value(base, f"acc_{t}") for t in common) / len(common) * PERCENT,
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


# ----------------------------------------------------------------------------- seeds

SEEDS_CSV = "seeds.csv"
SEEDS_MD = "seeds.md"


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
        if _is_dense(row) or not _truthy(_cell(row, "seed_dependent")):
            continue
        base = dense.get(row["model"])
        for metric in figure_columns(frame):
            values = _cell(row, metric + PER_SEED)
            if not values or all(v is None for v in values):
                continue
            scale = 1.0 if metric.startswith("ppl_") else PERCENT
            half = _eval_half_width(row, base, metric) if base is not None else None
            sd = _value(row, metric + SEED_SD)
            rows.append({"model": row["model"], "method": row["method"], "sparsity": row["sparsity_label"],
                         "metric": metric, "n_seeds": _n_seeds(row), "seeds": " ".join(map(str, row["seeds"])),
                         "per_seed": " ".join("-" if v is None else format_number(v * scale) for v in values),
                         "mean": _value(row, metric) * scale if _value(row, metric) is not None else None,
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
        base_payload = _ppl_payloads(base, dataset)[0]
        for payload in _ppl_payloads(row, dataset):
            interval = uncertainty.compare_ppl(payload, base_payload)
            if interval is not None:
                widths.append((interval.hi - interval.lo) / 2)
    else:
        task = metric[len("acc_"):]
        base_payload = _acc_payloads(base, task)[0]
        for payload in _acc_payloads(row, task):
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
             r.per_seed, format_number(r.mean), "-" if _missing(r.sd) else format_number(r.sd),
             "-" if _missing(r.eval_half_width) else format_number(r.eval_half_width),
             "-" if _missing(r.sd_over_half_width) else format_number(r.sd_over_half_width)]
            for r in seeds.itertuples()]
    return head + tabulate(rows, headers=["Model", "Method", "Sparsity", "Metric", "Seeds", "Per seed", "Mean",
                                          "SD", "Eval-only half-width", "SD / half-width"],
                           tablefmt="github", disable_numparse=True) + "\n"


# ----------------------------------------------------------------------------- the report

MAIN_TABLE_STEM = "main_table"
REPORT_MARKDOWN = "report.md"
GAINS_CSV = "gains.csv"
GAINS_TEX = "gains.tex"
PERPLEXITY_CSV = "perplexity.csv"
CELLS_CSV = "cells.csv"
COMPARISONS_CSV = "comparisons.csv"


def build_paper_report(df: pd.DataFrame | None = None, out_dir: str | os.PathLike | None = None,
                       *, tasks: Sequence[str] | None = None,
                       learned_methods: Sequence[str] | None = None,
                       baseline: str | Sequence[str] = PAPER_BASELINE, notice: str | None = None) -> str:
    """The paper's tables as markdown text (opening with `notice`, a quoted line, when given).

    With `df` None, the tables are rebuilt from the paper's published numbers alone (what
    `prunebench report --paper` shows); with records, they table the records with the paper's
    numbers beside every matching cell. With `out_dir`, also writes report.md, main_table.md /
    .tex / .csv, gains.csv / .tex, perplexity.csv, cells.csv, comparisons.csv (every
    difference with its 95% interval, see `comparisons_frame`) and dense_relative.csv / .md
    (report/dense_relative.py) there, each atomically.
    """
    paper_only = df is None
    reference = paper_reference_frame()
    frame = reference if paper_only else df
    layout = paper_layout(frame, tasks=tasks, reference=None if paper_only else reference)
    gains = gain_table(frame, learned_methods=learned_methods, baseline=baseline, tasks=tasks)
    # the published headline is LEAP's own figure: shown for the paper's comparison only
    headline = (PAPER_HEADLINE_GAIN if paper_only and tuple(learned_methods or (PAPER_METHOD,)) == (PAPER_METHOD,)
                and baseline == PAPER_BASELINE else None)
    ppl = perplexity_tables(frame)

    title = (f"# LEAP paper tables, rebuilt from the published numbers of {PAPER_SOURCE}"
             if paper_only else "# prunebench results in the LEAP paper's layout")
    main_markdown = render_markdown(layout)
    if notice:
        main_markdown = f"> {notice}\n\n{main_markdown}"
    sections = [title, "", *([f"> {notice}", ""] if notice else []), "## Main table", "", main_markdown,
                f"## Average-accuracy gain over {_baseline_name(baseline)} (points)", "",
                render_gains_markdown(gains, baseline, headline, learned_methods)]
    near = None if paper_only else chance.near_chance_frame(frame)
    if near is not None and not near.empty:
        sections += ["## Tasks near chance", "", chance.render_markdown(near)]
    if ppl:
        sections += ["## Perplexity", "", render_perplexity_markdown(ppl, frame)]
    from prunebench.report import dense_relative as dense_relative_report  # it builds on this module

    relative = None if paper_only else dense_relative_report.dense_relative_frame(frame)
    if relative is not None and not relative.empty:
        sections += ["## Distance from the dense model", "", dense_relative_report.render_markdown(relative)]
    if paper_only:
        sections += [patch_paper_markdown()]
    text = "\n".join(sections).rstrip() + "\n"

    if out_dir is not None:
        out = Path(out_dir)
        write_text_atomic(out / REPORT_MARKDOWN, text)
        write_text_atomic(out / f"{MAIN_TABLE_STEM}.md", main_markdown)
        write_text_atomic(out / f"{MAIN_TABLE_STEM}.tex", render_latex(layout))
        write_text_atomic(out / f"{MAIN_TABLE_STEM}.csv", _csv_text(layout_frame(layout)))
        write_text_atomic(out / GAINS_CSV, _csv_text(gains))
        write_text_atomic(out / GAINS_TEX, render_gains_latex(gains, baseline))
        write_text_atomic(out / PERPLEXITY_CSV, _csv_text(perplexity_long_frame(frame)))
        write_text_atomic(out / CELLS_CSV, cells_csv_text(frame))
        write_text_atomic(out / COMPARISONS_CSV, _csv_text(comparisons_frame(frame)))
        if relative is not None and not relative.empty:  # only records that carry the metrics
            write_text_atomic(out / dense_relative_report.DENSE_RELATIVE_CSV, _csv_text(relative))
            write_text_atomic(out / dense_relative_report.DENSE_RELATIVE_MD,
                              dense_relative_report.render_markdown(relative))
        seeds = seeds_frame(frame)
        write_text_atomic(out / SEEDS_CSV, _csv_text(seeds))
        write_text_atomic(out / SEEDS_MD, render_seeds_markdown(seeds))
    return text
