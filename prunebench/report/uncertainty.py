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
from prunebench.evaluate.dense_relative import HIST_LOG10_MAX, HIST_LOG10_MIN
from prunebench.evaluate.dense_relative import HIST_BINS

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


# ----------------------------------------------------------------------------- over seeds
#
# A cell run with several seeds has one score vector per seed (per-window NLL sums, per-item
# correctness) on the same windows / items. Its figure is the mean over seeds of the per-seed
# figure. The difference a - b between two such cells carries two kinds of noise: which
# calibration draw (and method randomness) each seed gave, and which windows / items were
# scored. The two-level (hierarchical) bootstrap resamples both, in the order they arose:
# seeds with replacement on each side independently (the two methods' draws are not paired),
# then, shared by both sides (the windows / items are), the windows / items with replacement;
# each resample's difference is the mean over its seeds of a, minus the same of b. Davison &
# Hinkley, Bootstrap Methods and their Application (1997), section 3.8 ("resample at both
# stages"); Field & Welsh, J. R. Stat. Soc. B 69 (2007). With k seeds there are only
# C(2k-1, k) distinct seed resamples (10 at k = 3), so the seed level is coarse: an interval
# from 3 seeds is a rough one and says so (n_seeds travels with it).

def _score_matrix(per_seed) -> np.ndarray | None:
    """[seeds, n] float64 from a list of per-seed score vectors of one length; None otherwise."""
    rows = [_finite_array(v) for v in per_seed or []]
    if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1 or len(rows[0]) == 0:
        return None
    return np.stack(rows)


def _two_level_samples(parts, stat, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap samples of the per-side seed mean of `stat`, for each part (a dataset or a task).

    parts: [(A [ka, n], B [kb, n])]: the two sides' per-seed scores on the same n windows/items
    (n may differ between parts, the seed counts may not). stat maps [..., n] -> [...].
    One seed resample per side and resample is shared by every part (a seed is one pruned model,
    scored on every task); windows / items are resampled within each part, the same indices on
    both sides. Returns (a, b), each [parts, n_resamples]."""
    ka, kb = parts[0][0].shape[0], parts[0][1].shape[0]
    rng = np.random.default_rng(seed)
    out_a, out_b = np.empty((len(parts), n_resamples)), np.empty((len(parts), n_resamples))
    for start in range(0, n_resamples, CHUNK):
        m = min(CHUNK, n_resamples - start)
        pick_a, pick_b = rng.integers(0, ka, size=(m, ka)), rng.integers(0, kb, size=(m, kb))
        for p, (a, b) in enumerate(parts):
            idx = rng.integers(0, a.shape[1], size=(m, a.shape[1]))
            va, vb = stat(a[:, idx]).T, stat(b[:, idx]).T  # [m, seeds]: each seed on each resample
            out_a[p, start:start + m] = np.take_along_axis(va, pick_a, axis=1).mean(axis=1)
            out_b[p, start:start + m] = np.take_along_axis(vb, pick_b, axis=1).mean(axis=1)
    return out_a, out_b


def bootstrap_ppl_diff_seeds(nll_a, nll_b, window_tokens: int, *, n_resamples: int = N_RESAMPLES,
                             seed: int = SEED, confidence: float = CONFIDENCE) -> PplInterval | None:
    """Two-level bootstrap of mean_s ppl(a_s) - mean_t ppl(b_t). nll_a / nll_b: one per-window NLL
    list per seed, all over the same windows. One seed on each side is the paired window
    bootstrap (`bootstrap_ppl_diff`). None on any mismatch or non-finite window."""
    a, b = _score_matrix(nll_a), _score_matrix(nll_b)
    if a is None or b is None or a.shape[1] != b.shape[1] or window_tokens <= 0:
        return None
    if len(a) == 1 and len(b) == 1:
        return bootstrap_ppl_diff(a[0], b[0], window_tokens, n_resamples=n_resamples, seed=seed, confidence=confidence)
    n = a.shape[1]

    def stat(x):
        return np.exp(x.sum(axis=-1) / (n * window_tokens))

    ppl_a, ppl_b = float(stat(a).mean()), float(stat(b).mean())
    sa, sb = _two_level_samples([(a, b)], stat, n_resamples, seed)
    lo, hi = _percentiles(sa[0] - sb[0], confidence)
    rel_lo, rel_hi = _percentiles(sa[0] / sb[0] - 1, confidence)
    return PplInterval(ppl_a - ppl_b, lo, hi, n, n_resamples, confidence,
                       ppl_a=ppl_a, ppl_b=ppl_b, rel_diff=ppl_a / ppl_b - 1, rel_lo=rel_lo, rel_hi=rel_hi)


def bootstrap_mean_acc_diff_seeds(tasks, *, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                                  confidence: float = CONFIDENCE) -> Interval | None:
    """Two-level bootstrap of the mean over tasks of (acc_a - acc_b), each side's accuracy the
    mean over its seeds. tasks: one (items_a per seed, items_b per seed) per task, items as
    '0'/'1' strings or 0/1 sequences in the same order everywhere. One seed on each side is
    `bootstrap_mean_acc_diff`."""
    if not tasks:
        return None
    parts = []
    for items_a, items_b in tasks:
        a = [_bits(x) for x in items_a or []]
        b = [_bits(x) for x in items_b or []]
        if not a or not b or any(x is None for x in a + b) or len({len(x) for x in a + b}) != 1 or len(a[0]) == 0:
            return None
        parts.append((np.stack(a).astype(np.float64), np.stack(b).astype(np.float64)))
    if len({p[0].shape[0] for p in parts}) != 1 or len({p[1].shape[0] for p in parts}) != 1:
        return None  # every task must come from the same seeds
    if parts[0][0].shape[0] == 1 and parts[0][1].shape[0] == 1:
        return bootstrap_mean_acc_diff([(a[0], b[0]) for a, b in parts], n_resamples=n_resamples, seed=seed,
                                       confidence=confidence)

    def stat(x):
        return x.mean(axis=-1)

    point = float(np.mean([stat(a).mean() - stat(b).mean() for a, b in parts]))
    sa, sb = _two_level_samples(parts, stat, n_resamples, seed)
    lo, hi = _percentiles((sa - sb).mean(axis=0), confidence)
    return Interval(point, lo, hi, sum(a.shape[1] for a, _ in parts), n_resamples, confidence)


def seed_spread(values) -> tuple[float, float | None]:
    """(mean, sample SD) of one figure over seeds; SD None below two seeds."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


# ----------------------------------------------------------------------------- dense-relative

DENSE_RELATIVE_METRICS = ("kl_mean", "kl_p99", "top1")


def _hist_matrix(per_window, bins: int) -> np.ndarray | None:
    """[n, bins] counts from one seed's per-window sparse histograms ([[bin, count], ...])."""
    if per_window is None:
        return None
    out = np.zeros((len(per_window), bins))
    for w, pairs in enumerate(per_window):
        for b, c in pairs or []:
            out[w, int(b)] += c
    return out


def _quantile_of_counts(counts: np.ndarray, q: float) -> np.ndarray:
    """Per row of [..., bins] counts: the upper edge of the bin holding the q-quantile (as
    prunebench.evaluate.dense_relative.histogram_quantile)."""
    bins = counts.shape[-1]
    cum = counts.cumsum(axis=-1)
    b = (cum >= q * cum[..., -1:]).argmax(axis=-1)
    return 10.0 ** (HIST_LOG10_MIN + (b + 1) * (HIST_LOG10_MAX - HIST_LOG10_MIN) / bins)


def dense_relative_intervals(a: dict, b: dict | None, window_tokens: int, *, n_resamples: int = N_RESAMPLES,
                             seed: int = SEED, confidence: float = CONFIDENCE) -> dict | None:
    """{metric: Interval} for the mean KL, its 99th percentile and top-1 agreement: of side `a`
    alone (b None: the interval of its own value) or of a - b, each side the mean over its seeds.
    a / b: {"kl": per seed the window KL sums, "top1": per seed the window agreement counts,
    "hist": per seed the window histograms}, all over the same windows. Two-level bootstrap as
    for perplexity: the seeds of each side, then the windows, the same indices on both sides.
    None on any mismatch or missing per-window data."""
    sides = []
    for side in (a, b) if b is not None else (a,):
        kl, top1 = _score_matrix(side.get("kl")), _score_matrix(side.get("top1"))
        hists = [_hist_matrix(h, HIST_BINS) for h in side.get("hist") or []]
        if kl is None or top1 is None or not hists or any(h is None for h in hists) or kl.shape != top1.shape \
                or len(hists) != kl.shape[0] or any(h.shape[0] != kl.shape[1] for h in hists):
            return None
        sides.append((kl, top1, np.stack(hists)))
    n = sides[0][0].shape[1]
    if any(s[0].shape[1] != n for s in sides) or window_tokens <= 0:
        return None
    tokens = n * window_tokens

    def stats(kl, top1, hist, weights):
        """[m, seeds] per metric for window weights [m, n] (how often each window was drawn)."""
        return {"kl_mean": weights @ kl.T / tokens, "top1": weights @ top1.T / tokens,
                "kl_p99": _quantile_of_counts(np.einsum("mn,snb->msb", weights, hist), 0.99)}

    rng = np.random.default_rng(seed)
    ones = np.ones((1, n))
    points = [{k: v[0].mean() for k, v in stats(*s, ones).items()} for s in sides]
    samples = [{k: np.empty(n_resamples) for k in DENSE_RELATIVE_METRICS} for _ in sides]
    for start in range(0, n_resamples, CHUNK):
        m = min(CHUNK, n_resamples - start)
        picks = [rng.integers(0, s[0].shape[0], size=(m, s[0].shape[0])) for s in sides]
        idx = rng.integers(0, n, size=(m, n))
        weights = np.zeros((m, n))
        np.add.at(weights, (np.arange(m)[:, None], idx), 1.0)
        for side, pick, out in zip(sides, picks, samples):
            for k, v in stats(*side, weights).items():
                out[k][start:start + m] = np.take_along_axis(v, pick, axis=1).mean(axis=1)
    result = {}
    for k in DENSE_RELATIVE_METRICS:
        diff = samples[0][k] - (samples[1][k] if b is not None else 0.0)
        lo, hi = _percentiles(diff, confidence)
        point = points[0][k] - (points[1][k] if b is not None else 0.0)
        result[k] = Interval(float(point), lo, hi, n, n_resamples, confidence)
    return result
