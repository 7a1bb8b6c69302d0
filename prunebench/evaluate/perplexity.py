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


def eval_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the id stream; a trailing partial window is dropped."""
    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    n_windows = token_ids.numel() // seqlen
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the evaluation text ({token_ids.numel()} tokens) is shorter than one window of {seqlen}")
    return token_ids[: n_windows * seqlen].view(n_windows, seqlen)


def perplexity(model, token_ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, device="cpu",
               progress: bool = True, max_windows: int | None = None) -> dict:
    """Returns {"value", "seqlen", "n_windows", "n_tokens"}; n_tokens counts predicted tokens."""
    windows = eval_windows(token_ids, seqlen, max_windows)
    n_windows = windows.shape[0]
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
                        chunk_windows: int = 32, progress: bool = True) -> dict:
    """Perplexity with only one decoder block on `device` at a time (the weights stay where they are).

    Same protocol and result as `perplexity`.  Windows go through in chunks of `chunk_windows`,
    so activation memory is chunk_windows x seqlen x hidden on CPU, whatever the depth.
    """
    from ..layerwise import _module_device, _non_block_modules, _to, capture_block_inputs
    from ..models import find_blocks

    windows = eval_windows(token_ids, seqlen, max_windows)
    n_windows = windows.shape[0]
    prefix, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
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
                    total_nll += F.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum").item()
                    total_tokens += seqlen - 1
                    bar.update(1)
            finally:
                for i, b in enumerate(originals):
                    blocks[i] = b
                for m, dev in homes:
                    m.to(dev)
    bar.close()
    model.train(was_training)
    mean_nll = total_nll / total_tokens
    value = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    return {"value": value, "seqlen": seqlen, "n_windows": n_windows, "n_tokens": total_tokens, "streamed": True}
