"""Perplexity by the papers' protocol (SparseGPT / Wanda / LEAP).

The evaluation text's documents are joined with "\\n\\n", tokenised once, cut into
non-overlapping windows of `seqlen` tokens (a trailing partial window is dropped), and the
perplexity is exp of the mean next-token negative log-likelihood over every predicted token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..progress import progress_bar


def perplexity(model, token_ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, device="cpu",
               progress: bool = True, max_windows: int | None = None) -> dict:
    """Returns {"value", "seqlen", "n_windows", "n_tokens"}; n_tokens counts predicted tokens."""
    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    n_windows = token_ids.numel() // seqlen
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the evaluation text ({token_ids.numel()} tokens) is shorter than one window of {seqlen}")
    windows = token_ids[: n_windows * seqlen].view(n_windows, seqlen)
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    bar = progress_bar(total=n_windows, desc=f"perplexity @{seqlen}", enabled=progress, unit="win")
    with torch.no_grad():
        for start in range(0, n_windows, batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                  reduction="sum")
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
            bar.update(batch.shape[0])
    bar.close()
    model.train(was_training)
    mean_nll = total_nll / total_tokens
    value = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    return {"value": value, "seqlen": seqlen, "n_windows": n_windows, "n_tokens": total_tokens}
