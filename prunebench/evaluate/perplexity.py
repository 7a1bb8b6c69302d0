"""Perplexity by the papers' protocol (SparseGPT / Wanda / LEAP).

The evaluation text's documents are joined with "\\n\\n", tokenised once, cut into
non-overlapping windows of `seqlen` tokens (a trailing partial window is dropped), and the
perplexity is exp of the mean next-token negative log-likelihood over every predicted token.
A token's NLL is the log-sum-exp of its logits minus its target's logit, from one scan of the
vocabulary in blocks (prunebench.evaluate.dense_relative.scan_vocabulary); given the dense model's top-k
summary of the same windows, the same scan gives KL(dense || model) and top-1 agreement.

A model whose tokenizer starts every sequence with a prefix (Gemma's <bos>; see
prunebench.modeling.sequence_start) gets it in every window: a window is the prefix followed by
seqlen - len(prefix) text tokens, consecutive windows step that many text tokens, and only the
text tokens are scored (each once), the prefix being context. With no prefix a window's first
token has no context and is not scored, as in the papers' protocol.

Every result also keeps the summed NLL of each window (`window_nll`, in window order) so that two
cells scored on the same windows can be compared with a paired bootstrap
(prunebench.report.uncertainty). A model whose mean NLL is not finite has diverged: its result
says so (`"value": None, "diverged": True`) and holds no NaN / inf, so the record stays valid JSON.
"""
from __future__ import annotations

import hashlib
import math

import torch

from prunebench.evaluate import dense_relative
from prunebench.evaluate.dense_relative import DenseSummary
from prunebench.modeling.output_head import OutputHead
from ..progress import progress_bar
from prunebench.engines.layerwise import _module_device, _non_block_modules, _to, capture_block_inputs
from prunebench.modeling.models import find_blocks


def eval_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None, prefix=()) -> torch.Tensor:
    """[n, seqlen] windows: `prefix` then the next seqlen - len(prefix) tokens of the id stream, the
    text parts non-overlapping; a trailing partial window is dropped."""
    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    prefix = [int(t) for t in prefix]
    if len(prefix) >= seqlen:
        raise ValueError(f"a sequence start of {len(prefix)} tokens leaves no text in a window of {seqlen}")
    text_len = seqlen - len(prefix)
    n_windows = token_ids.numel() // text_len
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the evaluation text ({token_ids.numel()} tokens) is shorter than one window of {text_len}")
    windows = token_ids[: n_windows * text_len].view(n_windows, text_len)
    if prefix:
        start = torch.tensor(prefix, dtype=windows.dtype).expand(n_windows, len(prefix))
        windows = torch.cat([start, windows], dim=1)
    return windows


def first_scored(prefix) -> int:
    """Position of a window's first scored token: the first text token after the prefix, and
    never position 0 (nothing predicts it)."""
    return max(len(prefix), 1)


def scored_text(n_windows: int, seqlen: int, prefix, stream_tokens: int) -> str:
    """Which tokens a result scored, in words (the record's `scored`)."""
    if not prefix:
        return (f"the first {n_windows} non-overlapping windows of {seqlen} tokens: "
                f"tokens 0-{n_windows * seqlen - 1} of {stream_tokens}")
    text_len = seqlen - len(prefix)
    return (f"the first {n_windows} windows of {seqlen} tokens, each the sequence start {list(prefix)} then "
            f"{text_len} text tokens: text tokens 0-{n_windows * text_len - 1} of {stream_tokens}, each scored once")


# 6 significant digits: a window's NLL sum is a few hundred to a few thousand nats, so the
# stored sums lose < 1e-6 relative, far below any difference a bootstrap can resolve.
WINDOW_NLL_DIGITS = 6


def windows_fingerprint(windows: torch.Tensor) -> str:
    """Hash of the scored token ids: two results with the same fingerprint saw the same windows."""
    return hashlib.sha256(windows.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _finite_or_none(x: float) -> float | None:
    return float(f"{x:.{WINDOW_NLL_DIGITS}g}") if math.isfinite(x) else None


def _finish(window_nll: list[float], windows: torch.Tensor, prefix, **extra) -> dict:
    """The result dict shared by `perplexity` and `perplexity_streamed`."""
    n_windows, seqlen = windows.shape
    window_tokens = seqlen - first_scored(prefix)
    total_tokens = n_windows * window_tokens
    # fsum of the unrounded sums: the exact total; any non-finite window makes the mean non-finite.
    finite = all(math.isfinite(x) for x in window_nll)
    mean_nll = math.fsum(window_nll) / total_tokens if finite else math.nan
    # exp overflows past ~709 nats/token: not representable either, so it counts as diverged.
    value = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else None
    return {"value": value, "diverged": value is None, "seqlen": seqlen, "n_windows": n_windows,
            "n_tokens": total_tokens, "window_tokens": window_tokens,
            "window_nll": [_finite_or_none(x) for x in window_nll],
            "windows_fingerprint": windows_fingerprint(windows), "sequence_start": list(prefix), **extra}


# Predicted positions scanned together: each scan reads the head's weights once (a vocabulary
# block at a time), so a whole usual batch goes in one scan. Memory does not grow with it: only
# one block of dense_relative.BLOCK_BYTES of logits (and its exps) exists at a time.
SCAN_ROWS = 4096


def score_chunk_tokens(vocab: int) -> int:
    """How many tokens' worth of float32 logits exist at once while scoring (one vocabulary block
    of the scan), for memory estimates (prunebench.run.plan)."""
    return max(1, dense_relative.BLOCK_BYTES // (4 * vocab))


class _Scores:
    """Per-row results of one batch, gathered chunk by chunk."""

    def __init__(self):
        self.nll, self.kl, self.agree, self.ids, self.logp, self.tail = [], [], [], [], [], []

    def cat(self, name, shape):
        parts = getattr(self, name)
        return torch.cat(parts).view(*shape, *parts[0].shape[1:]) if parts else None


def _score_rows(rows, targets, vocab, logits_of, scores: _Scores, dense_rows=None, summarize_k: int = 0):
    """Score c rows: NLL always; with `dense_rows` (ids, log-probs, tail of the dense summary) the
    KL and top-1 agreement; with `summarize_k` this model's own top-k summary."""
    c = rows.shape[0]
    block = lambda lo, hi: logits_of(rows, lo, hi)  # noqa: E731
    if summarize_k:
        ids, logp, tail, scan = dense_relative.summarize_rows(block, c, vocab, summarize_k, targets=targets,
                                                              device=rows.device)
        scores.ids.append(ids)
        scores.logp.append(logp)
        scores.tail.append(tail)
    else:
        ids = dense_rows[0] if dense_rows is not None else None
        scan = dense_relative.scan_vocabulary(block, c, vocab, targets=targets, ids=ids, device=rows.device)
        if dense_rows is not None:
            kl, agree = dense_relative.kl_and_top1_rows(scan, *dense_rows)
            scores.kl.append(kl)
            scores.agree.append(agree)
    scores.nll.append(scan.lse - scan.target)


def score_batch(model, batch: torch.Tensor, first: int, head: OutputHead | None = None, *, dense_rows=None,
                summarize_k: int = 0) -> _Scores:
    """Scores of positions first..T-1 of `batch` [B, T] (position p - 1 predicts token p), in
    row-major order.  With `head` the vocabulary head runs one block of the vocabulary at a time
    on the last hidden states, so no [tokens x vocabulary] logits exist at all; without, the
    model's own logits are scanned in place (no float32 copy of them)."""
    if head is not None:
        states = head.decoder(input_ids=batch, use_cache=False).last_hidden_state
        vocab = head.linear.out_features
        logits_of = head.block_logits
    else:
        states = model(input_ids=batch, use_cache=False).logits
        vocab = states.shape[-1]
        logits_of = lambda rows, lo, hi: rows[:, lo:hi]  # noqa: E731
    # hidden states: the whole batch in one scan; the model's own logits: window by window, as views
    # (flattening a slice of several windows' logits would copy them all)
    groups = [slice(None)] if head is not None else [slice(b, b + 1) for b in range(batch.shape[0])]
    scores, done = _Scores(), 0
    for g in groups:
        rows = states[g, first - 1:-1].reshape(-1, states.shape[-1])
        targets = batch[g, first:].reshape(-1)
        for c in range(0, rows.shape[0], SCAN_ROWS):
            stop = min(c + SCAN_ROWS, rows.shape[0])
            part = None if dense_rows is None else tuple(x[done + c:done + stop] for x in dense_rows)
            _score_rows(rows[c:stop], targets[c:stop], vocab, logits_of, scores, part, summarize_k)
        done += rows.shape[0]
    return scores


def _dense_rows(dense: DenseSummary, start: int, stop: int):
    """The dense summary's rows for windows start..stop-1, flattened as score_batch orders them."""
    k = dense.k
    return (dense.topk_ids[start:stop].reshape(-1, k), dense.topk_logp[start:stop].reshape(-1, k),
            dense.tail_logp[start:stop].reshape(-1))


def _check_dense(dense: DenseSummary, windows: torch.Tensor, first: int) -> None:
    expected = (windows.shape[0], windows.shape[1] - first)
    if tuple(dense.tail_logp.shape) != expected:
        raise ValueError(f"the dense summary covers {tuple(dense.tail_logp.shape)} positions, these windows "
                         f"score {expected}")


def _evaluate(model, token_ids, seqlen, *, batch_size, device, progress, max_windows, prefix, dense=None,
              summarize_k: int = 0):
    prefix = [int(t) for t in prefix]
    windows = eval_windows(token_ids, seqlen, max_windows, prefix)
    s = first_scored(prefix)
    if dense is not None:
        _check_dense(dense, windows, s)
    n_windows = windows.shape[0]
    window_nll: list[float] = []
    kl, agree, parts = [], [], []
    head = OutputHead.find(model)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=n_windows, desc=f"perplexity @{seqlen}", enabled=progress, unit="win")
    with torch.no_grad():
        for start in range(0, n_windows, batch_size):
            batch = windows[start:start + batch_size].to(device)
            shape = (batch.shape[0], -1)
            rows = None if dense is None else tuple(x.to(device) for x in _dense_rows(dense, start, start + batch.shape[0]))
            scores = score_batch(model, batch, s, head, dense_rows=rows, summarize_k=summarize_k)
            window_nll += scores.cat("nll", shape).sum(dim=1).tolist()
            if dense is not None:
                kl.append(scores.cat("kl", shape).cpu())
                agree.append(scores.cat("agree", shape).cpu())
            if summarize_k:
                parts.append(tuple(scores.cat(n, shape).cpu() for n in ("ids", "logp", "tail")))
            bar.update(batch.shape[0])
    bar.close()
    model.train(was_training)
    result = _finish(window_nll, windows, prefix)
    if dense is not None:
        result["dense_relative"] = dense_relative.result(torch.cat(kl), torch.cat(agree), dense)
    summary = None
    if summarize_k:
        ids, logp, tail = (torch.cat(p) for p in zip(*parts))
        summary = DenseSummary(ids, logp, tail)
    return result, summary


def perplexity(model, token_ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, device="cpu",
               progress: bool = True, max_windows: int | None = None, prefix=(),
               dense: DenseSummary | None = None) -> dict:
    """Returns {"value", "diverged", "seqlen", "n_windows", "n_tokens", "window_tokens", "window_nll",
    "windows_fingerprint", "sequence_start"}; n_tokens counts scored tokens, window_nll[i] is window
    i's summed NLL. `prefix`: the tokenizer's sequence start, put before every window's text.
    With `dense` (the dense model's summary of the same windows) also "dense_relative": KL(dense ||
    this model) and top-1 agreement, from the same scan of the logits as the NLL."""
    return _evaluate(model, token_ids, seqlen, batch_size=batch_size, device=device, progress=progress,
                     max_windows=max_windows, prefix=prefix, dense=dense)[0]


def perplexity_and_summary(model, token_ids: torch.Tensor, seqlen: int, *, k: int, batch_size: int = 1, device="cpu",
                           progress: bool = True, max_windows: int | None = None, prefix=()):
    """(the perplexity result, the model's top-k DenseSummary of the same windows): what the dense
    model's evaluation gives every later cell to compare with (two scans: the tail is summed
    after the top k are known)."""
    return _evaluate(model, token_ids, seqlen, batch_size=batch_size, device=device, progress=progress,
                     max_windows=max_windows, prefix=prefix, summarize_k=k)


class _Replay(torch.nn.Module):
    """Stands in for a decoder block during the final pass of `perplexity_streamed`: returns a
    precomputed output (last block) or its input unchanged (every other block), in the block's
    own return type, so the model's forward runs only embeddings, final norm and head."""

    def __init__(self, outputs=None, as_tuple=False):
        super().__init__()
        self.outputs, self.as_tuple, self.calls = outputs, as_tuple, 0

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states
        if self.outputs is not None:
            out = self.outputs[self.calls].to(hidden_states.device, hidden_states.dtype)
            self.calls += 1
        return (out,) if self.as_tuple else out


def perplexity_streamed(model, token_ids: torch.Tensor, seqlen: int, *, device="cpu", max_windows: int | None = None,
                        chunk_windows: int = 32, progress: bool = True, prefix=(),
                        dense: DenseSummary | None = None) -> dict:
    """Perplexity with only one decoder block on `device` at a time (the weights stay where they are).

    Same protocol and result as `perplexity` (`dense` as there).  Windows go through in chunks of `chunk_windows`,
    so activation memory is chunk_windows x seqlen x hidden on CPU, whatever the depth.
    """
    prefix = [int(t) for t in prefix]
    windows = eval_windows(token_ids, seqlen, max_windows, prefix)
    s = first_scored(prefix)
    if dense is not None:
        _check_dense(dense, windows, s)
    kl, agree = [], []
    n_windows = windows.shape[0]
    _, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    window_nll: list[float] = []
    bar = progress_bar(total=n_windows, desc=f"perplexity @{seqlen} (streamed)", enabled=progress, unit="win")
    with torch.no_grad():
        for start in range(0, n_windows, chunk_windows):
            chunk = windows[start:start + chunk_windows]
            hidden, args, kwargs = capture_block_inputs(model, chunk, device)
            args_d, kwargs_d = _to(args, device), _to(kwargs, device)
            as_tuple = False
            for block in blocks:
                home = _module_device(block)
                block.to(device)
                outs = []
                for h in hidden:
                    out = block(h.to(device), *args_d, **kwargs_d)
                    as_tuple = isinstance(out, (tuple, list))
                    outs.append((out[0] if as_tuple else out).to("cpu"))
                hidden = outs
                block.to(home)
            # Final pass: the real forward (final norm, head, any family quirks) with replayed blocks.
            originals = list(blocks)
            for i in range(len(blocks)):
                blocks[i] = _Replay(hidden if i == len(blocks) - 1 else None, as_tuple)
            outer = _non_block_modules(model, {id(b) for b in blocks})
            homes = [(m, _module_device(m)) for m in outer]
            try:
                for m in outer:
                    m.to(device)
                for i, w in enumerate(chunk):
                    batch = w.unsqueeze(0).to(device)
                    rows = None
                    if dense is not None:
                        rows = tuple(x.to(device) for x in _dense_rows(dense, start + i, start + i + 1))
                    # the model's forward (replayed blocks) gives its logits; scanned in place
                    scores = score_batch(model, batch, s, None, dense_rows=rows)
                    window_nll.append(scores.cat("nll", (1, -1)).sum().item())
                    if dense is not None:
                        kl.append(scores.cat("kl", (1, -1)).cpu())
                        agree.append(scores.cat("agree", (1, -1)).cpu())
                    bar.update(1)
            finally:
                for i, b in enumerate(originals):
                    blocks[i] = b
                for m, dev in homes:
                    m.to(dev)
    bar.close()
    model.train(was_training)
    result = _finish(window_nll, windows, prefix, streamed=True)
    if dense is not None:
        result["dense_relative"] = dense_relative.result(torch.cat(kl), torch.cat(agree), dense)
    return result
