"""Paired differences between two cells (collapsed rows, see frame.collapse_duplicate_cells), in
display units, with their 95% paired-bootstrap intervals over the seeds of each side and then the
shared evaluation windows / items (prunebench.report.uncertainty): perplexity, accuracy (one task
or the mean over tasks) and the dense-relative metrics (KL mean, KL p99, top-1 agreement).

A pair without the per-window / per-item scores, scored on other windows or items, or with more
records than seeds gets its difference without an interval and a note saying why, never dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from prunebench.report import uncertainty
from prunebench.report.format import DIVERGED, EVAL_NOISE_ONLY, NO_INTERVAL, NOT_COMPARABLE, NOT_SIGNIFICANT, Marker
from prunebench.report.frame import PER_SEED, cell_value, int_cell, ppl_cell_value, raw_cell, seed_count, truthy
from prunebench.report.paper import PERCENT

MEAN_OF_RECORDS = "no interval (mean of several records of one seed)"
# What an interval's width covers.
SEEDS_AND_EVAL = "seeds and evaluation"
EVAL_ONLY = "evaluation noise only"         # a seed-dependent side has a single seed
NO_SEED_NOISE = "evaluation (seed-invariant cells)"  # neither side can move with the seed


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


def noise_of(row: pd.Series, base: pd.Series) -> tuple[tuple[int, int], str]:
    """The seeds behind each side, and which noise their interval covers."""
    counts = (seed_count(row), seed_count(base))
    dependent = [truthy(raw_cell(r, "seed_dependent")) for r in (row, base)]
    if not any(dependent):
        return counts, NO_SEED_NOISE
    if any(d and k < 2 for d, k in zip(dependent, counts)):
        return counts, EVAL_ONLY
    return counts, SEEDS_AND_EVAL


def per_seed(row: pd.Series, column: str) -> list:
    """A score vector's values per seed (after collapsing), else the row's one vector."""
    values = raw_cell(row, column + PER_SEED)
    return list(values) if values is not None else [raw_cell(row, column)]


def several_records(*rows: pd.Series) -> bool:
    """More records than seeds: reruns of one seed under other keys, averaged without an interval."""
    return any(int(row.get("n_records", 1) or 1) > seed_count(row) for row in rows)


# ----------------------------------------------------------------------------- perplexity, accuracy

def _ppl_payload(row: pd.Series, dataset: str) -> dict:
    nll = raw_cell(row, f"window_nll_{dataset}")
    return {"diverged": truthy(raw_cell(row, f"diverged_{dataset}")),
            "seqlen": int_cell(row, f"ppl_{dataset}_seqlen"),
            "n_windows": int_cell(row, f"n_windows_{dataset}"),
            "window_tokens": int_cell(row, f"window_tokens_{dataset}"),
            "window_nll": None if nll is None else list(nll),
            "windows_fingerprint": raw_cell(row, f"windows_fp_{dataset}")}


def _acc_payload(row: pd.Series, task: str) -> dict:
    subtasks = raw_cell(row, f"per_item_tasks_{task}")
    return {"n": int_cell(row, f"n_{task}"), "per_item": raw_cell(row, f"per_item_{task}"),
            "per_item_tasks": None if subtasks is None else [list(x) for x in subtasks]}


def ppl_payloads(row: pd.Series, dataset: str) -> list[dict]:
    """One perplexity payload per seed of the row (the window NLL of each seed)."""
    payload = _ppl_payload(row, dataset)
    return [{**payload, "window_nll": None if nll is None else list(nll)}
            for nll in per_seed(row, f"window_nll_{dataset}")]


def acc_payloads(row: pd.Series, task: str) -> list[dict]:
    """One zero-shot payload per seed of the row (the per-item correctness of each seed)."""
    payload = _acc_payload(row, task)
    return [{**payload, "per_item": items} for items in per_seed(row, f"per_item_{task}")]


def ppl_difference(row: pd.Series, base: pd.Series, dataset: str) -> Difference | None:
    """Perplexity of `row` minus that of `base` on `dataset`; None when either was not measured."""
    a, b = ppl_cell_value(row, dataset), ppl_cell_value(base, dataset)
    if a is None or b is None:
        return None
    if math.isinf(a) or math.isinf(b):
        return Difference(None, note=DIVERGED)
    if several_records(row, base):
        return Difference(a - b, note=MEAN_OF_RECORDS)
    pa, pb = ppl_payloads(row, dataset), ppl_payloads(base, dataset)
    reason = next(filter(None, (uncertainty.ppl_not_comparable(x, y) for x in pa for y in pb)), None)
    interval = None if reason else uncertainty.bootstrap_ppl_diff_seeds(
        [x["window_nll"] for x in pa], [y["window_nll"] for y in pb], int(pa[0]["window_tokens"]))
    n_seeds, noise = noise_of(row, base)
    if interval is None:
        return Difference(a - b, note=reason or "not comparable", n_seeds=n_seeds, noise=noise)
    return Difference(a - b, interval.lo, interval.hi, rel_diff=a / b - 1, rel_lo=interval.rel_lo,
                      rel_hi=interval.rel_hi, n=interval.n, n_seeds=n_seeds, noise=noise)


def avg_acc_difference(row: pd.Series, base: pd.Series, tasks: Sequence[str]) -> Difference | None:
    """Mean over the tasks both rows measured of acc(row) - acc(base), in percent points, with
    the interval from resampling items within each task; None when no task is shared."""
    common = [t for t in tasks if cell_value(row, f"acc_{t}") is not None and cell_value(base, f"acc_{t}") is not None]
    if not common:
        return None
    point = sum(cell_value(row, f"acc_{t}") - cell_value(base, f"acc_{t}") for t in common) / len(common) * PERCENT
    if several_records(row, base):
        return Difference(point, note=MEAN_OF_RECORDS)
    per_task = [(acc_payloads(row, t), acc_payloads(base, t)) for t in common]
    reasons = [uncertainty.acc_not_comparable(a, b) for sa, sb in per_task for a in sa for b in sb]
    reason = next((r for r in reasons if r and r.startswith("not comparable")), None) or \
        next((r for r in reasons if r), None)
    interval = None if reason else uncertainty.bootstrap_mean_acc_diff_seeds(
        [([a["per_item"] for a in sa], [b["per_item"] for b in sb]) for sa, sb in per_task])
    n_seeds, noise = noise_of(row, base)
    if interval is None:
        return Difference(point, note=reason or "not comparable", n_seeds=n_seeds, noise=noise)
    return Difference(point, interval.lo * PERCENT, interval.hi * PERCENT, n=interval.n, n_seeds=n_seeds,
                      noise=noise)


def acc_difference(row: pd.Series, base: pd.Series, task: str) -> Difference | None:
    """acc(row) - acc(base) on one task, in percent points."""
    return avg_acc_difference(row, base, [task])


# ----------------------------------------------------------------------------- dense-relative metrics

# metric -> (frame column prefix, unit in comparisons, display scale, label)
DENSE_RELATIVE_METRICS = {"kl_mean": ("kl_", "nats", 1.0, "KL"), "kl_p99": ("kl_p99_", "nats", 1.0, "KL p99"),
                          "top1": ("top1_", "points", 100.0, "top-1 %")}


def _dense_relative_side(row: pd.Series, dataset: str) -> dict | None:
    side = {"kl": per_seed(row, f"window_kl_{dataset}"), "top1": per_seed(row, f"window_top1_{dataset}"),
            "hist": per_seed(row, f"window_kl_hist_{dataset}")}
    return None if any(v is None for vs in side.values() for v in vs) else side


def _window_tokens(row: pd.Series, dataset: str) -> int | None:
    return int_cell(row, f"window_tokens_{dataset}")


def dense_relative_cell_intervals(row: pd.Series, dataset: str) -> dict | None:
    """{metric: Interval of the cell's own value (not a difference)} or None when it has no
    per-window values."""
    side, tokens = _dense_relative_side(row, dataset), _window_tokens(row, dataset)
    return None if side is None or not tokens else uncertainty.dense_relative_intervals(side, None, tokens)


def dense_relative_differences(row: pd.Series, base: pd.Series, dataset: str) -> dict:
    """{metric: (value, base value, Difference)} for row - base, in display units; empty when either
    side lacks the metrics. Paired: both sides' windows must be the same windows."""
    a_side, b_side = _dense_relative_side(row, dataset), _dense_relative_side(base, dataset)
    if a_side is None or b_side is None:
        return {}
    n_seeds, noise = noise_of(row, base)
    same = raw_cell(row, f"windows_fp_{dataset}") == raw_cell(base, f"windows_fp_{dataset}")
    tokens = _window_tokens(row, dataset)
    intervals = None
    if same and tokens and tokens == _window_tokens(base, dataset) and not several_records(row, base):
        intervals = uncertainty.dense_relative_intervals(a_side, b_side, tokens)
    out = {}
    for metric, (prefix, _, scale, _) in DENSE_RELATIVE_METRICS.items():
        a, b = cell_value(row, f"{prefix}{dataset}"), cell_value(base, f"{prefix}{dataset}")
        if a is None or b is None:
            continue
        a, b = a * scale, b * scale
        if intervals is None:
            note = MEAN_OF_RECORDS if several_records(row, base) else "not scored on the same windows"
            out[metric] = (a, b, Difference(a - b, note=note, n_seeds=n_seeds, noise=noise))
        else:
            i = intervals[metric]
            out[metric] = (a, b, Difference(a - b, i.lo * scale, i.hi * scale, n=i.n, n_seeds=n_seeds, noise=noise))
    return out
