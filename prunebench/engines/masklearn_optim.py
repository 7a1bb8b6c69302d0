"""The optimizer of the mask logits and what its state costs."""
from __future__ import annotations

import torch


def make_adamw(params, c):
    """AdamW; the fused kernel where available (one pass per tensor instead of several: the
    update touches every logit and both moments).  `optimizer: adamw-8bit`: torchao's AdamW8bit,
    the same decoupled-decay update computed in float32 with both moments stored as 8-bit codes
    and one float32 scale per block of 256 (2.03 bytes of state per logit instead of 8; tensors
    under 4096 values keep float32 moments)."""
    kwargs = dict(lr=c.lr, betas=(0.9, c.beta2), weight_decay=c.weight_decay)
    if getattr(c, "optimizer", "adamw") == "adamw-8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **kwargs)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this process holds: its shards' (DTensor, ZeRO), and for
    quantised moments their codes and scales (the tensors inside the subclass)."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: the local one

    def nbytes(t) -> int:
        if hasattr(t, "to_local"):
            t = t.to_local()
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass: count what it stores
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(nbytes(v) for state in inner.state.values() for v in state.values() if torch.is_tensor(v))
