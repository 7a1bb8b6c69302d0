"""How far a pruned model's next-token distributions moved from the dense model's, and the
one-pass scan over the vocabulary that perplexity and these metrics share.

Per predicted token: KL(dense || pruned) and whether the two models' top-1 tokens agree.
Perplexity sees only the probability of the observed token; these see the whole distribution, so
they resolve differences between methods that perplexity leaves inside its noise.

The dense side is summarised once per window and reused by every cell: its top-k log-probabilities
and one tail bucket holding the rest of the mass (log of the mass outside the top k, summed
exactly, not as 1 - top-k mass). The KL computed here is the KL between the two distributions
coarsened to those k + 1 outcomes, which by the data processing inequality never exceeds the true
KL: a lower bound, whose gap is at most the dense tail mass times the KL between the two tails, so
the dense tail mass is kept as the bound's measure. With k = vocabulary size it is the exact KL.
Top-1 agreement is exact for any k >= 1.

The scan (`scan_vocabulary`) takes a chunk of rows and walks the vocabulary in blocks small
enough to stay in cache, keeping a running log-sum-exp (float64 accumulators), the running
argmax, the target's logit, the logits at given ids and the mass outside them, and optionally a
running top-k. No [tokens x vocabulary] array is made beyond one block, and each block is read
while it is still in cache: the log-softmax a cross-entropy would materialise never exists.
Per window the KL results are kept as sums and as a histogram of log10 KL on fixed bins, so a
paired bootstrap over windows can resample both the mean and the 99th percentile.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from prunebench.store.atomic import atomic_path
from prunebench.errors import UserError

# log10(KL) bins: 1e-7 .. 1e3 nats in steps of 0.05 decades; values outside land in the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -7.0, 3.0, 200
DEFAULT_K = 64  # dense ids kept per position: 64 x (4 + 4) bytes + the tail, about 0.5 kB a token
# One block of float32 logits scanned at once. Small blocks would stay in cache, but every tensor op
# has a fixed cost (a parallel region: milliseconds on a loaded machine), so blocks are large and
# the ops per block few; 64 MiB: Gemma-3's 262k vocabulary in 4 blocks of 256 rows.
BLOCK_BYTES = 64 * 2 ** 20
KL_BOUND = ("KL(dense || pruned) over the dense model's top-k tokens plus one bucket for the rest of "
            "the vocabulary: a lower bound of the exact KL (data processing inequality), exact when k is "
            "the vocabulary size; the gap is at most dense_tail_mass times the KL between the two tails")


@dataclass
class DenseSummary:
    """The dense model's distribution at each predicted position of a batch of windows."""

    topk_ids: torch.Tensor    # [n, T, k] int64, most probable first
    topk_logp: torch.Tensor   # [n, T, k] float32
    tail_logp: torch.Tensor   # [n, T] float32: log of the mass outside the top k (-inf when none)

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]


@dataclass
class RowScan:
    """What one scan over the vocabulary found for each of c rows."""

    lse: torch.Tensor                      # [c] float64 log-sum-exp of the row's logits
    argmax: torch.Tensor                   # [c] int64 (the first maximum)
    target: Optional[torch.Tensor] = None  # [c] float64 logit of the target id
    at_ids: Optional[torch.Tensor] = None  # [c, k] float64 logits at the given ids
    tail: Optional[torch.Tensor] = None    # [c] float64 log of the mass outside the given ids, -inf if none
    top_values: Optional[torch.Tensor] = None  # [c, k] float32, descending
    top_ids: Optional[torch.Tensor] = None     # [c, k] int64


def block_width(rows: int, vocab: int) -> int:
    return max(1, min(vocab, BLOCK_BYTES // (4 * max(rows, 1))))


def scan_vocabulary(block_logits: Callable[[int, int], torch.Tensor], rows: int, vocab: int, *,
                    targets=None, ids=None, topk: int = 0, width: Optional[int] = None,
                    device="cpu") -> RowScan:
    """One pass over the vocabulary in blocks: `block_logits(lo, hi)` gives the [rows, hi - lo]
    float32 logits of ids lo..hi-1 (computed or sliced; consumed while in cache)."""
    width = width or block_width(rows, vocab)
    f64 = torch.float64
    run_max = torch.full((rows,), float("-inf"), dtype=f64, device=device)
    run_sum = torch.zeros(rows, dtype=f64, device=device)  # sum of exp(logit - run_max)
    arg = torch.zeros(rows, dtype=torch.int64, device=device)
    target = torch.zeros(rows, dtype=f64, device=device) if targets is not None else None
    at_ids = tail_sum = None
    if ids is not None:
        at_ids = torch.zeros(ids.shape, dtype=f64, device=device)
        tail_sum = torch.zeros(rows, dtype=f64, device=device)
    top_v = top_i = None
    for lo in range(0, vocab, width):
        hi = min(lo + width, vocab)
        w = hi - lo
        block = block_logits(lo, hi).float()
        b_max, b_arg = block.max(dim=-1)
        b_max64 = b_max.double()
        arg = torch.where(b_max64 > run_max, b_arg + lo, arg)  # strict: the first maximum wins
        new_max = torch.maximum(run_max, b_max64)
        # exp(logit - block max) <= 1, summed in float32 per block (pairwise), carried in float64;
        # one spare column takes the scatter of ids that lie in other blocks
        e = torch.empty(rows, w + 1, dtype=torch.float32, device=block.device)
        torch.sub(block, b_max.unsqueeze(1), out=e[:, :w]).exp_()
        e[:, w] = 0.0
        rescale_run, rescale_block = torch.exp(run_max - new_max), torch.exp(b_max64 - new_max)
        run_sum = run_sum * rescale_run + e.sum(dim=-1).double() * rescale_block
        if targets is not None:
            inside = (targets >= lo) & (targets < hi)
            got = block.gather(1, (targets - lo).clamp(0, w - 1).unsqueeze(1)).squeeze(1)
            target = torch.where(inside, got.double(), target)
        if ids is not None:
            inside = (ids >= lo) & (ids < hi)
            local = torch.where(inside, ids - lo, w)
            at_ids = torch.where(inside, block.gather(1, local.clamp(max=w - 1)).double(), at_ids)
            # the mass outside the ids, summed directly (1 - top-k mass would lose a small tail to rounding)
            e.scatter_(1, local, 0.0)
            tail_sum = tail_sum * rescale_run + e.sum(dim=-1).double() * rescale_block
        if topk:
            cand_v, cand_i = block.topk(min(topk, w), dim=-1)
            cand_i = cand_i + lo
            if top_v is not None:
                cand_v, order = torch.cat([top_v, cand_v], 1).topk(min(topk, top_v.shape[1] + cand_v.shape[1]), dim=-1)
                cand_i = torch.cat([top_i, cand_i], 1).gather(1, order)
            top_v, top_i = cand_v, cand_i
        run_max = new_max
    if topk:  # ties in id order, so the first id is the argmax (top-1 agreement of a model with itself is 1)
        by_id = top_i.argsort(dim=1)
        top_v, top_i = top_v.gather(1, by_id), top_i.gather(1, by_id)
        order = top_v.sort(dim=1, descending=True, stable=True).indices
        top_v, top_i = top_v.gather(1, order), top_i.gather(1, order)
    lse = run_max + run_sum.log()
    tail = None
    if ids is not None:
        tail = torch.where(tail_sum > 0, tail_sum.log() + run_max, torch.full_like(tail_sum, float("-inf")))
    return RowScan(lse, arg, target, at_ids, tail, top_v, top_i)


def summarize_rows(block_logits, rows: int, vocab: int, k: int, *, targets=None, width=None, device="cpu"):
    """The dense summary of c rows: (top-k ids [c, k], their log-probs [c, k] float32, tail log-mass
    [c] float32, the first pass's RowScan for the NLL).  Two passes: the top k are known only
    after the first, and the second sums the mass outside them exactly."""
    k = min(k, vocab)
    first = scan_vocabulary(block_logits, rows, vocab, targets=targets, topk=k, width=width, device=device)
    second = scan_vocabulary(block_logits, rows, vocab, ids=first.top_ids, width=width, device=device)
    logp = (first.top_values.double() - first.lse.unsqueeze(1)).float()
    return first.top_ids, logp, (second.tail - second.lse).float(), first


def kl_and_top1_rows(scan: RowScan, ids: torch.Tensor, p_logp: torch.Tensor, p_tail: torch.Tensor):
    """Per row: KL(dense || pruned) over the dense top-k + tail, and top-1 agreement, from a scan of
    the pruned logits made with the dense ids."""
    q, q_tail = scan.at_ids - scan.lse.unsqueeze(1), scan.tail - scan.lse
    p, p_tail = p_logp.double(), p_tail.double()
    head = (p.exp() * (p - q)).sum(dim=-1)
    # a dense tail of zero mass contributes nothing, whatever the pruned model puts there
    rest = torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(p_tail))
    return (head + rest).clamp_(min=0.0), scan.argmax == ids[:, 0]  # rounding can leave -1e-12


def _chunks(logits: torch.Tensor, chunk_tokens: int):
    flat = logits.reshape(-1, logits.shape[-1])
    for start in range(0, flat.shape[0], chunk_tokens):
        rows = flat[start:start + chunk_tokens]
        yield start, rows, (lambda lo, hi, rows=rows: rows[:, lo:hi])


def summarize_dense(logits: torch.Tensor, k: int, chunk_tokens: int = 1024, width=None) -> DenseSummary:
    """Top-k + tail summary of dense logits [n, T, V] (the positions to score, already shifted)."""
    n, t, vocab = logits.shape
    k = min(k, vocab)
    parts = [summarize_rows(f, rows.shape[0], vocab, k, width=width, device=logits.device)[:3]
             for _, rows, f in _chunks(logits, chunk_tokens)]
    ids, logp, tail = (torch.cat(p) for p in zip(*parts))
    return DenseSummary(ids.view(n, t, k), logp.view(n, t, k), tail.view(n, t))


def token_kl_and_top1(dense: DenseSummary, logits: torch.Tensor, chunk_tokens: int = 1024, width=None):
    """Per position: KL(dense || pruned) over the k + 1 outcomes [n, T] and top-1 agreement [n, T]."""
    n, t, vocab = logits.shape
    ids = dense.topk_ids.reshape(n * t, -1)
    p_top, p_tail = dense.topk_logp.reshape(n * t, -1), dense.tail_logp.reshape(-1)
    kl, agree = [], []
    for start, rows, f in _chunks(logits, chunk_tokens):
        stop = start + rows.shape[0]
        scan = scan_vocabulary(f, rows.shape[0], vocab, ids=ids[start:stop], width=width, device=logits.device)
        a, b = kl_and_top1_rows(scan, ids[start:stop], p_top[start:stop], p_tail[start:stop])
        kl.append(a)
        agree.append(b)
    return torch.cat(kl).view(n, t), torch.cat(agree).view(n, t)


def log10_histogram(values: torch.Tensor) -> list[int]:
    """Counts of log10(values) on the fixed bins (zeros and tiny values land in the first bin)."""
    x = values.double().clamp(min=10.0 ** HIST_LOG10_MIN).log10()
    width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    index = ((x - HIST_LOG10_MIN) / width).floor().long().clamp_(0, HIST_BINS - 1)
    return torch.bincount(index.flatten(), minlength=HIST_BINS).tolist()


def sparse_histogram(counts) -> list[list[int]]:
    """[[bin, count], ...] for the non-empty bins (a record keeps a few dozen pairs, not 200)."""
    return [[b, int(c)] for b, c in enumerate(counts) if c]


def dense_histogram(pairs) -> list[int]:
    counts = [0] * HIST_BINS
    for b, c in pairs:
        counts[int(b)] += int(c)
    return counts


def histogram_quantile(counts, q: float) -> float:
    """The q-quantile of values binned by `log10_histogram` (the upper edge of its bin)."""
    total = sum(counts)
    if total == 0:
        return float("nan")
    width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    running = 0
    for b, c in enumerate(counts):
        running += c
        if running >= q * total:
            return 10.0 ** (HIST_LOG10_MIN + (b + 1) * width)
    return 10.0 ** HIST_LOG10_MAX


def window_rows(kl: torch.Tensor, agree: torch.Tensor, dense_tail_logp: torch.Tensor) -> list[dict]:
    """Per window of [n, T] per-token values: summed KL, top-1 agreements, token count, mean dense
    tail mass and the KL histogram."""
    tail_mass = dense_tail_logp.double().exp()
    return [{"kl_sum": float(kl[w].sum()), "top1_agree": int(agree[w].sum()), "n_tokens": int(kl.shape[1]),
             "dense_tail_mass": float(tail_mass[w].mean()), "kl_log10_hist": log10_histogram(kl[w])}
            for w in range(kl.shape[0])]


def window_summaries(dense: DenseSummary, logits: torch.Tensor, chunk_tokens: int = 1024) -> list[dict]:
    """Per window: summed KL, top-1 agreements, token count, dense tail mass and the KL histogram."""
    kl, agree = token_kl_and_top1(dense, logits, chunk_tokens)
    return window_rows(kl, agree, dense.tail_logp)


def aggregate(kl_sums, top1_counts, hists, window_tokens: int) -> dict:
    """Mean KL per token, its 99th percentile (histogram bin's upper edge) and top-1 agreement over
    the windows given (a bootstrap passes a resample)."""
    n = len(kl_sums) * window_tokens
    merged = [0] * HIST_BINS
    for h in hists:
        for b, c in h:
            merged[int(b)] += int(c)
    return {"kl_mean": math.fsum(kl_sums) / n, "kl_p99": histogram_quantile(merged, 0.99),
            "top1": sum(top1_counts) / n}


def _digits(x: float) -> float:
    return float(f"{x:.6g}")  # as the per-window NLL sums: far below any resolvable difference


def _record(k, kl_sums, top1, hists, window_tokens, tail_mass, **extra) -> dict:
    return {**aggregate(kl_sums, top1, hists, window_tokens), "k": k, "kl": KL_BOUND,
            "p99": f"upper edge of the 99th percentile's bin: log10(KL) bins of {(HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS:g} "
                   f"from {HIST_LOG10_MIN:g} to {HIST_LOG10_MAX:g}",
            "dense_tail_mass": tail_mass, "window_tokens": window_tokens,
            "window_kl": [_digits(x) for x in kl_sums], "window_top1": list(top1), "window_kl_hist": hists, **extra}


def result(kl: torch.Tensor, agree: torch.Tensor, dense: DenseSummary) -> dict:
    """The record's dense_relative entry from per-token KL and agreement [n windows, T scored]."""
    rows = window_rows(kl, agree, dense.tail_logp)
    return _record(dense.k, [r["kl_sum"] for r in rows], [r["top1_agree"] for r in rows],
                   [sparse_histogram(r["kl_log10_hist"]) for r in rows], int(kl.shape[1]),
                   _digits(float(dense.tail_logp.double().exp().mean())))


def by_definition(n_windows: int, window_tokens: int, k: int, dense_tail_mass: float | None) -> dict:
    """The dense model against itself: KL 0 and top-1 1 by definition, not a measured float noise.
    (Every token sits in the histogram's first bin, so a bootstrap of a p99 gap reads <= 1e-7.)"""
    out = _record(k, [0.0] * n_windows, [window_tokens] * n_windows, [[[0, window_tokens]]] * n_windows,
                  window_tokens, dense_tail_mass, by_definition=True)
    out["kl_p99"] = 0.0
    return out


# --- the dense summary on disk: safetensors (tensors and strings only: nothing is unpickled) ---

SUMMARY_FORMAT = "prunebench dense summary 1"


def summary_name(identity: dict) -> str:
    """The file's name: a hash of everything that makes the summary (model content, dtype, device
    kind, windows, sequence start, k, evaluation code)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return f"dense-{hashlib.sha256(text.encode()).hexdigest()[:24]}.safetensors"


def _tensors(summary: DenseSummary) -> dict:
    return {"topk_ids": summary.topk_ids.to("cpu", torch.int32).contiguous(),
            "topk_logp": summary.topk_logp.to("cpu", torch.float32).contiguous(),
            "tail_logp": summary.tail_logp.to("cpu", torch.float32).contiguous()}


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def save_summary(path, summary: DenseSummary, identity: dict) -> None:
    """Atomic: two runners writing the same summary at once leave one whole file."""
    from safetensors.torch import save_file


    tensors = _tensors(summary)
    meta = {"format": SUMMARY_FORMAT, "identity": json.dumps(identity, sort_keys=True), "sha256": _digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_summary(path, identity: dict) -> DenseSummary:
    """The summary at `path`, checked against `identity` and its own digest; a damaged or foreign
    file is refused in one line (the file is the user's to delete: it is never silently replaced)."""
    from safetensors import safe_open


    hint = "delete it and rerun: the first cell that needs it recomputes it"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a truncated or garbled file
        raise UserError(f"dense summary {path} is unreadable ({type(exc).__name__})", hint=hint) from None
    if meta.get("format") != SUMMARY_FORMAT:
        raise UserError(f"dense summary {path} is not a {SUMMARY_FORMAT} file", hint=hint)
    if meta.get("identity") != json.dumps(identity, sort_keys=True):
        raise UserError(f"dense summary {path} was made for other windows, model or code than its name says", hint=hint)
    if set(tensors) != {"topk_ids", "topk_logp", "tail_logp"} or meta.get("sha256") != _digest(tensors):
        raise UserError(f"dense summary {path} is damaged (its content does not match its digest)", hint=hint)
    ids, logp, tail = tensors["topk_ids"], tensors["topk_logp"], tensors["tail_logp"]
    if ids.shape != logp.shape or ids.shape[:-1] != tail.shape or ids.shape[-1] != min(identity["k"], identity["vocab"]):
        raise UserError(f"dense summary {path} has inconsistent shapes {tuple(ids.shape)} / {tuple(tail.shape)}", hint=hint)
    return DenseSummary(ids.long(), logp, tail)
