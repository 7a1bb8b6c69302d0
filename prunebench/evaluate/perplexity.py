"""Perplexity by the papers' protocol (SparseGPT / Wanda / LEAP).

The evaluation text's documents are joined with "\\n\\n", tokenised once, cut into
non-overlapping windows of `seqlen` tokens (a trailing partial window is dropped), and the
perplexity is exp of the mean next-token negative log-likelihood over every predicted token.

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
import torch.nn.functional as F

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


# The float32 logits scored at once: a few hundred MB, whatever the vocabulary (SmolLM2's 49k: 1365
# tokens; Gemma-3's 262k: 256), so the [tokens x vocabulary] logits of a batch never exist whole.
SCORE_CHUNK_BYTES = 256 * 2 ** 20


def score_chunk_tokens(vocab: int) -> int:
    return max(1, SCORE_CHUNK_BYTES // (4 * vocab))


def token_nll(model, batch: torch.Tensor, first: int, head: OutputHead | None = None) -> torch.Tensor:
    """[B, T - first] float64 next-token NLL of positions first..T-1 of `batch` [B, T].

    With `head` (the model split at its last hidden state) the vocabulary head runs a chunk of
    tokens at a time, so no batch's [tokens x vocabulary] logits exist whole; without, the model's
    own logits are scored a chunk of positions at a time (no float32 copy of them all).  A token's
    NLL is the log-softmax of its own logits row either way, so chunking changes no value."""
    if head is not None:
        states = head.decoder(input_ids=batch, use_cache=False).last_hidden_state
        vocab = head.linear.out_features
    else:
        states = model(input_ids=batch, use_cache=False).logits
        vocab = states.shape[-1]
    chunk = score_chunk_tokens(vocab)
    n, t = batch.shape
    nll = torch.empty(n, t - first, dtype=torch.float64, device=batch.device)
    for b in range(n):
        for c in range(first, t, chunk):
            stop = min(c + chunk, t)
            rows = states[b, c - 1:stop - 1]  # position p - 1 predicts token p
            logits = (head.logits(rows) if head is not None else rows).float()
            nll[b, c - first:stop - first] = F.cross_entropy(logits, batch[b, c:stop], reduction="none")
    return nll


def perplexity(model, token_ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, device="cpu",
               progress: bool = True, max_windows: int | None = None, prefix=()) -> dict:
    """Returns {"value", "diverged", "seqlen", "n_windows", "n_tokens", "window_tokens", "window_nll",
    "windows_fingerprint", "sequence_start"}; n_tokens counts scored tokens, window_nll[i] is window
    i's summed NLL. `prefix`: the tokenizer's sequence start, put before every window's text."""
    prefix = [int(t) for t in prefix]
    windows = eval_windows(token_ids, seqlen, max_windows, prefix)
    s = first_scored(prefix)
    n_windows = windows.shape[0]
    window_nll: list[float] = []
    head = OutputHead.find(model)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=n_windows, desc=f"perplexity @{seqlen}", enabled=progress, unit="win")
    with torch.no_grad():
        for start in range(0, n_windows, batch_size):
            batch = windows[start:start + batch_size].to(device)
            window_nll += token_nll(model, batch, s, head).sum(dim=1).tolist()
            bar.update(batch.shape[0])
    bar.close()
    model.train(was_training)
    return _finish(window_nll, windows, prefix)


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
                        chunk_windows: int = 32, progress: bool = True, prefix=()) -> dict:
    """Perplexity with only one decoder block on `device` at a time (the weights stay where they are).

    Same protocol and result as `perplexity`.  Windows go through in chunks of `chunk_windows`,
    so activation memory is chunk_windows x seqlen x hidden on CPU, whatever the depth.
    """
    prefix = [int(t) for t in prefix]
    windows = eval_windows(token_ids, seqlen, max_windows, prefix)
    s = first_scored(prefix)
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
                for w in chunk:
                    batch = w.unsqueeze(0).to(device)
                    logits = model(input_ids=batch, use_cache=False).logits.float()
                    nll = F.cross_entropy(logits[0, s - 1:-1], batch[0, s:], reduction="none")
                    window_nll.append(nll.double().sum().item())
                    bar.update(1)
            finally:
                for i, b in enumerate(originals):
                    blocks[i] = b
                for m, dev in homes:
                    m.to(dev)
    bar.close()
    model.train(was_training)
    return _finish(window_nll, windows, prefix, streamed=True)
