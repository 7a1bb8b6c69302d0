"""A causal LM split at its last hidden state: the decoder, the vocabulary head's linear layer and
the logit soft-cap, so a loss or a perplexity can apply the head a chunk of tokens at a time and
never hold the [tokens x vocabulary] logits at once (Gemma-3's 262k vocabulary: 1 GB of float32
logits per 1000 tokens).  Used by the mask-learning engine's chunked loss and by evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from prunebench.errors import UserError


@dataclass(frozen=True)
class OutputHead:
    """A causal LM split at its last hidden state, for a loss that applies the vocabulary head a
    chunk of tokens at a time: the decoder, the head's linear layer and the logit soft-cap."""

    decoder: nn.Module
    linear: nn.Linear
    softcap: Optional[float] = None

    @classmethod
    def of(cls, model, hint: str = "use the model's own logits") -> "OutputHead":
        """Only the plain head (a linear layer, optionally soft-capped as the config says) is
        reproduced; a model whose forward does anything else to its logits is refused."""
        config = getattr(model, "config", None)
        text = getattr(config, "text_config", None) or config
        get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
        decoder = get_decoder() if callable(get_decoder) else None
        linear = get_head() if callable(get_head) else None
        if decoder is None or decoder is model or not isinstance(linear, nn.Linear):
            raise UserError(f"cannot split {type(model).__name__} into a decoder and a linear output head",
                            hint=hint)
        for name in ("logits_scaling", "logit_scale", "output_multiplier_scale"):
            value = getattr(text, name, None)
            if value not in (None, 1, 1.0):
                raise UserError(f"{type(model).__name__} scales its logits ({name}={value}), which a chunked "
                                "head does not reproduce", hint=hint)
        return cls(decoder, linear, getattr(text, "final_logit_softcapping", None) or None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.linear(hidden)
        if self.softcap:  # in the model's dtype, as its own forward does
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def block_logits(self, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The logits of vocabulary ids lo..hi-1 only (a row slice of the head's weight)."""
        bias = None if self.linear.bias is None else self.linear.bias[lo:hi]
        out = nn.functional.linear(hidden, self.linear.weight[lo:hi], bias)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @classmethod
    def find(cls, model) -> Optional["OutputHead"]:
        """The split, or None for a model whose head is more than a linear layer and a soft-cap."""
        try:
            return cls.of(model)
        except UserError:
            return None
