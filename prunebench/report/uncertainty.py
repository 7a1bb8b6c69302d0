"""Paired-bootstrap intervals for differences between two cells scored on the same data.

Two pruned variants of one model are scored on the same perplexity windows and the same
zero-shot items, so their difference is measured far more precisely than either value alone:
resampling the *shared* windows / items (the same indices on both sides) keeps that pairing.

* perplexity: resample window indices; on each side ppl = exp(sum nll / sum tokens);
  report ppl_a - ppl_b and ppl_a / ppl_b - 1;
* accuracy: resample item indices; report acc_a - acc_b (fractions). For 0/1 items the
  resampled difference depends only on how many items each side alone got right, so it is
  drawn exactly as a multinomial over (only a right, only b right, rest): the same
  distribution as index resampling, at a cost independent of the number of items;
* the average over tasks (the paper's Avg): resample items within each task, average the
  per-task differences with equal weights.

A difference is significant only when its 95% percentile interval excludes zero. Inputs that
were not scored on the same windows / items are refused (None), never silently compared.
Everything is seeded: the same inputs always give the same interval.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

N_RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
# Resamples drawn per chunk of the window bootstrap: bounds memory at CHUNK x n_windows indices.
CHUNK = 250

NO_ITEM_DATA = "no interval (record has no per-item data)"


@dataclass(frozen=True)
class Interval:
    """A difference a - b with its percentile bootstrap interval [lo, hi]."""
    diff: float
    lo: float
    hi: float
    n: int                      # windows or items (summed over tasks) resampled
    n_resamples: int
    confidence: float = CONFIDENCE

    @property
    def significant(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


@dataclass(frozen=True)
class PplInterval(Interval):
    """Perplexity difference ppl_a - ppl_b, plus the relative difference ppl_a / ppl_b - 1."""
    ppl_a: float = math.nan
    ppl_b: float = math.nan
    rel_diff: float = math.nan
    rel_lo: float = math.nan
    rel_hi: float = math.nan


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def _finite_array(values) -> np.ndarray | None:
    if values is None or any(v is None for v in values):
        return None
    arr = np.asarray(values, dtype=np.float64)
    return arr if arr.ndim == 1 and np.isfinite(arr).all() else None


def bootstrap_ppl_diff(nll_a: Sequence[float], nll_b: Sequence[float], window_tokens: int, *,
                       n_resamples: int = N_RESAMPLES, seed: int = SEED,
                       confidence: float = CONFIDENCE) -> PplInterval | None:
    """Paired bootstrap of ppl_a - ppl_b from per-window NLL sums over the same windows (each
    window predicting `window_tokens` tokens). None if the lists differ in length, are empty,
    or hold a non-finite (diverged) window."""
    a, b = _finite_array(nll_a), _finite_array(nll_b)
    if a is None or b is None or len(a) != len(b) or len(a) == 0 or window_tokens <= 0:
        return None
    n = len(a)
    ppl_a, ppl_b = math.exp(a.sum() / (n * window_tokens)), math.exp(b.sum() / (n * window_tokens))
    rng = np.random.default_rng(seed)
    diffs, rels = [], []
    for start in range(0, n_resamples, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, n_resamples - start), n))
        pa = np.exp(a[idx].sum(axis=1) / (n * window_tokens))
        pb = np.exp(b[idx].sum(axis=1) / (n * window_tokens))
        diffs.append(pa - pb)
        rels.append(pa / pb - 1)
    diffs, rels = np.concatenate(diffs), np.concatenate(rels)
    lo, hi = _percentiles(diffs, confidence)
    rel_lo, rel_hi = _percentiles(rels, confidence)
    return PplInterval(ppl_a - ppl_b, lo, hi, n, n_resamples, confidence,
                       ppl_a=ppl_a, ppl_b=ppl_b, rel_diff=ppl_a / ppl_b - 1, rel_lo=rel_lo, rel_hi=rel_hi)


def _bits(items) -> np.ndarray | None:
    """'0'/'1' string or a sequence of 0/1 (bools) -> int array; None if anything else."""
    if items is None:
        return None
    if isinstance(items, str):
        if set(items) - {"0", "1"}:
            return None
        return np.frombuffer(items.encode("ascii"), dtype=np.uint8) - ord("0")
    arr = np.asarray(list(items), dtype=np.float64)
    if arr.ndim != 1 or not np.isin(arr, (0.0, 1.0)).all():
        return None
    return arr.astype(np.uint8)


def bootstrap_mean_acc_diff(pairs: Sequence[tuple], *, n_resamples: int = N_RESAMPLES,
                            seed: int = SEED, confidence: float = CONFIDENCE) -> Interval | None:
    """Paired bootstrap of the mean over tasks of (acc_a - acc_b), resampling items within each
    task. `pairs`: one (items_a, items_b) per task, items as '0'/'1' strings or 0/1 sequences in
    the same item order on both sides. None if any task's two sides differ in length or are
    empty or not 0/1."""
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    point, n_items = 0.0, 0
    for items_a, items_b in pairs:
        a, b = _bits(items_a), _bits(items_b)
        if a is None or b is None or len(a) != len(b) or len(a) == 0:
            return None
        n = len(a)
        only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        counts = rng.multinomial(n, [only_a / n, only_b / n, (n - only_a - only_b) / n], size=n_resamples)
        total += (counts[:, 0] - counts[:, 1]) / n
        point += (only_a - only_b) / n
        n_items += n
    k = len(pairs)
    lo, hi = _percentiles(total / k, confidence)
    return Interval(point / k, lo, hi, n_items, n_resamples, confidence)


def bootstrap_acc_diff(items_a, items_b, **kwargs) -> Interval | None:
    """Paired bootstrap of acc_a - acc_b (fractions) over the same items; see
    bootstrap_mean_acc_diff."""
    return bootstrap_mean_acc_diff([(items_a, items_b)], **kwargs)


# ----------------------------------------------------------------------------- record level

def ppl_not_comparable(a: dict | None, b: dict | None) -> str | None:
    """Why two perplexity results (record dicts: seqlen, n_windows, window_tokens, window_nll,
    windows_fingerprint; of the same dataset) cannot be paired, or None if they can."""
    if not a or not b:
        return "not comparable: a side has no perplexity"
    if a.get("diverged") or b.get("diverged"):
        return "not comparable: diverged"
    if a.get("window_nll") is None or b.get("window_nll") is None:
        return NO_ITEM_DATA
    for key in ("seqlen", "n_windows", "window_tokens"):
        if a.get(key) != b.get(key):
            return f"not comparable: different {key} ({a.get(key)} vs {b.get(key)})"
    if len(a["window_nll"]) != len(b["window_nll"]) or len(a["window_nll"]) != a.get("n_windows"):
        return "not comparable: different number of windows"
    fa, fb = a.get("windows_fingerprint"), b.get("windows_fingerprint")
    if fa and fb and fa != fb:
        return "not comparable: different windows (token fingerprints differ)"
    if any(v is None for v in a["window_nll"]) or any(v is None for v in b["window_nll"]):
        return "not comparable: non-finite window"
    return None


def compare_ppl(a: dict | None, b: dict | None, **kwargs) -> PplInterval | None:
    """ppl(a) - ppl(b) with its interval, from two records' results on one dataset; None when
    `ppl_not_comparable` gives a reason."""
    if ppl_not_comparable(a, b) is not None:
        return None
    return bootstrap_ppl_diff(a["window_nll"], b["window_nll"], int(a["window_tokens"]), **kwargs)


def acc_not_comparable(a: dict | None, b: dict | None) -> str | None:
    """Why two zero-shot task results (record dicts: n, per_item, per_item_tasks; of the same
    task) cannot be paired, or None if they can."""
    if not a or not b:
        return "not comparable: a side has no result"
    if a.get("per_item") is None or b.get("per_item") is None:
        return NO_ITEM_DATA
    if a.get("metric") != b.get("metric"):
        return f"not comparable: different metric ({a.get('metric')} vs {b.get('metric')})"
    if a.get("n") != b.get("n") or len(a["per_item"]) != len(b["per_item"]):
        return f"not comparable: different number of items ({a.get('n')} vs {b.get('n')})"
    ta, tb = a.get("per_item_tasks"), b.get("per_item_tasks")
    if (ta or tb) and [list(x) for x in ta or []] != [list(x) for x in tb or []]:
        return "not comparable: different subtasks"
    return None


def compare_acc(a: dict | None, b: dict | None, **kwargs) -> Interval | None:
    """acc(a) - acc(b) (fractions) with its interval, from two records' results on one task."""
    if acc_not_comparable(a, b) is not None:
        return None
    return bootstrap_acc_diff(a["per_item"], b["per_item"], **kwargs)


def compare_mean_acc(pairs: Sequence[tuple[dict, dict]], **kwargs) -> Interval | None:
    """The mean over tasks of acc(a) - acc(b), one (a, b) pair of task results per task."""
    if not pairs or any(acc_not_comparable(a, b) is not None for a, b in pairs):
        return None
    return bootstrap_mean_acc_diff([(a["per_item"], b["per_item"]) for a, b in pairs], **kwargs)
