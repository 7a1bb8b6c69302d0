"""How far a pruned model's next-token distributions moved from the dense model's.

(Not yet part of the evaluation: it moves into prunebench/evaluate/ when perplexity.py calls it,
with the regeneration that change needs; until then the evaluation code is exactly the code that
made the committed records.)

Per predicted token: KL(dense || pruned) and whether the two models' top-1 tokens agree.
Perplexity sees only the probability of the observed token; these see the whole distribution, so
they resolve differences between methods that perplexity leaves inside its noise.

The dense side is summarised once per window and reused by every cell: its top-k log-probabilities
and one tail bucket holding the rest of the mass (log(1 - sum of the top k)). The KL computed here
is the KL between the two distributions coarsened to those k + 1 outcomes, which by the data
processing inequality never exceeds the true KL; the gap is at most the dense tail mass times the
KL between the two tails, so the dense tail mass is kept as the bound's measure (`tail_mass`).
With k = vocabulary size it is the exact KL. Top-1 agreement is exact for any k >= 1.

Everything runs chunk by chunk over tokens, so no float32 [tokens x vocabulary] array beyond the
model's own logits is made. Per window the results are kept as sums and as a histogram of
log10 KL on fixed bins, so a paired bootstrap over windows can resample both the mean and the
99th percentile.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# log10(KL) bins: 1e-7 .. 1e3 nats in steps of 0.05 decades; values outside land in the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -7.0, 3.0, 200


@dataclass
class DenseSummary:
    """The dense model's distribution at each predicted position of a batch of windows."""

    topk_ids: torch.Tensor    # [n, T, k] int64, most probable first
    topk_logp: torch.Tensor   # [n, T, k] float32
    tail_logp: torch.Tensor   # [n, T] float32: log of the mass outside the top k (-inf when none)

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]


def _rows(logits: torch.Tensor, chunk_tokens: int):
    flat = logits.reshape(-1, logits.shape[-1])
    for start in range(0, flat.shape[0], chunk_tokens):
        yield start, flat[start:start + chunk_tokens].float().log_softmax(dim=-1)


def _tail(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if ids.shape[-1] == logp.shape[-1]:
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)


def summarize_dense(logits: torch.Tensor, k: int, chunk_tokens: int = 1024) -> DenseSummary:
    """Top-k + tail summary of dense logits [n, T, V] (the positions to score, already shifted)."""
    n, t, vocab = logits.shape
    k = min(k, vocab)
    ids = torch.empty(n * t, k, dtype=torch.int64, device=logits.device)
    top = torch.empty(n * t, k, dtype=torch.float32, device=logits.device)
    tail = torch.empty(n * t, dtype=torch.float32, device=logits.device)
    for start, logp in _rows(logits, chunk_tokens):
        values, index = logp.topk(k, dim=-1)
        stop = start + logp.shape[0]
        ids[start:stop], top[start:stop], tail[start:stop] = index, values, _tail(logp, index)
    return DenseSummary(ids.view(n, t, k), top.view(n, t, k), tail.view(n, t))


def token_kl_and_top1(dense: DenseSummary, logits: torch.Tensor, chunk_tokens: int = 1024):
    """Per position: KL(dense || pruned) over the k + 1 outcomes [n, T] and top-1 agreement [n, T]."""
    n, t, _ = logits.shape
    ids = dense.topk_ids.reshape(n * t, -1)
    p_top = dense.topk_logp.reshape(n * t, -1)
    p_tail = dense.tail_logp.reshape(-1)
    kl = torch.empty(n * t, dtype=torch.float64, device=logits.device)
    agree = torch.empty(n * t, dtype=torch.bool, device=logits.device)
    for start, q in _rows(logits, chunk_tokens):
        stop = start + q.shape[0]
        i, pt, ptail = ids[start:stop], p_top[start:stop], p_tail[start:stop]
        qt, qtail = q.gather(-1, i), _tail(q, i)
        pt, qt = pt.double(), qt.double()  # k columns: summing them in float64 costs nothing
        head = (pt.exp() * (pt - qt)).sum(dim=-1)
        # a dense tail of zero mass contributes nothing, whatever the pruned model puts there
        ptail, qtail = ptail.double(), qtail.double()
        rest = torch.where(torch.isfinite(ptail), ptail.exp() * (ptail - qtail), torch.zeros_like(ptail))
        kl[start:stop] = (head + rest).clamp_(min=0.0)  # rounding can leave -1e-9
        agree[start:stop] = q.argmax(dim=-1) == i[:, 0]
    return kl.view(n, t), agree.view(n, t)


def log10_histogram(values: torch.Tensor) -> list[int]:
    """Counts of log10(values) on the fixed bins (zeros and tiny values land in the first bin)."""
    x = values.double().clamp(min=10.0 ** HIST_LOG10_MIN).log10()
    width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    index = ((x - HIST_LOG10_MIN) / width).floor().long().clamp_(0, HIST_BINS - 1)
    return torch.bincount(index.flatten(), minlength=HIST_BINS).tolist()


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


def window_summaries(dense: DenseSummary, logits: torch.Tensor, chunk_tokens: int = 1024) -> list[dict]:
    """Per window: summed KL, top-1 agreements, token count, dense tail mass and the KL histogram."""
    kl, agree = token_kl_and_top1(dense, logits, chunk_tokens)
    tail_mass = dense.tail_logp.double().exp()
    return [{"kl_sum": float(kl[w].sum()), "top1_agree": int(agree[w].sum()), "n_tokens": int(kl.shape[1]),
             "dense_tail_mass": float(tail_mass[w].mean()), "kl_log10_hist": log10_histogram(kl[w])}
            for w in range(kl.shape[0])]
