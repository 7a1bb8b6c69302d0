"""The training loss of learned masks and the recomputations that keep its memory down: the mean
next-token cross-entropy (whole, or the output head a chunk of tokens at a time) and activation
checkpointing of the decoder blocks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from prunebench.modeling.output_head import OutputHead

def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _chunk_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead) -> torch.Tensor:
    return F.cross_entropy(head.logits(hidden).float(), targets, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, ids: torch.Tensor, head: OutputHead, chunk: int) -> torch.Tensor:
    """lm_loss from the last hidden states, `chunk` tokens at a time: each chunk's logits are
    recomputed in backward (torch.utils.checkpoint) instead of kept, so the [tokens, vocab]
    logits never exist at once (Gemma-3's 262k vocabulary at 4096 tokens: 4.3 GB per float32
    copy, of which the full loss keeps about three).  The same value as lm_loss up to the
    order of the float sums."""
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    total = None
    for start in range(0, h.shape[0], chunk):
        part = checkpoint(_chunk_ce_sum, h[start:start + chunk], targets[start:start + chunk], head,
                          use_reentrant=False)
        total = part if total is None else total + part
    return total / h.shape[0]


def model_lm_loss(model, ids: torch.Tensor, head: Optional[OutputHead] = None, chunk: int = 0) -> torch.Tensor:
    """Mean next-token loss of `model` on `ids`: from its logits, or with `chunk` > 0 through
    `head` a chunk at a time."""
    if not chunk:
        return lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
    hidden = head.decoder(input_ids=ids, use_cache=False).last_hidden_state
    return chunked_lm_loss(hidden, ids, head, chunk)


def enable_checkpointing(model) -> bool:
    """Activation checkpointing of the decoder blocks, non-reentrant: the regulariser statistics
    leave the checkpointed blocks as side outputs, and the counter-based noise makes the
    recomputation draw the same masks.  False if the model cannot checkpoint."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    return True


def disable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
