"""The learned masks' gates on the model: counter-based noise and the patch that makes every
prunable linear compute with its mask.

The noise is counter-based: a layer's seed is a function of (method, seed, step, micro-batch,
layer), so a resumed run or an activation-checkpointing recomputation draws exactly what an
uninterrupted run draws."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from prunebench.engines.distributed import LogitHolder
from prunebench.modeling.models import weight_matrix

# u ~ U[0, 1) is clamped to [eps, 1 - eps] before a logit or a log, so the noise stays finite.
NOISE_EPS = 1e-6


def noise_seed(method: str, base_seed: int, step: int, micro: int, layer: int) -> int:
    """A counter-based seed for the noise of one layer in one micro-batch: fresh noise on every
    forward, yet reproducible from (seed, step, micro-batch, layer) alone, so no generator state
    needs saving and a checkpointing recomputation draws the same mask."""
    text = f"{method}-noise:{base_seed}:{step}:{micro}:{layer}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def logistic_noise(shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """L ~ Logistic(0, 1) = logit(U), U ~ Uniform(0, 1) (the difference of two Gumbels)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return torch.logit_(u, eps=NOISE_EPS)


def gumbel_noise(shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """G ~ Gumbel(0, 1) = -log(-log U)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp_(NOISE_EPS, 1.0 - NOISE_EPS)
    return u.log_().neg_().log_().neg_()


class MaskedLinears:
    """Swaps the forward of every prunable linear for one that computes with a mask.

    mode 'soft': the method's sampled soft mask (training); 'hard': given hard masks (held-out
    evaluation); 'off': the dense weights.  The modules' weights are never written while patched.
    The statistics each soft forward returns are kept per layer (a checkpointing recomputation
    overwrites them, never double counts).
    """

    def __init__(self, modules: dict, logits, pruner):
        # logits: a LogitHolder (the engine's), or {layer: {key: nn.Parameter}} (scripts, tests);
        # pruner: the LearnedMaskPruner whose masked_weight draws each soft mask
        self.logits = logits if isinstance(logits, LogitHolder) else LogitHolder(logits)
        self.modules, self.pruner = modules, pruner
        self.mode = "off"
        self.sched: dict = {}
        self.seed, self.step, self.micro = 0, 0, 0
        self.hard: dict = {}
        self.stats: dict = {}
        self._saved_forward = {}
        for index, (name, module) in enumerate(modules.items()):
            self._saved_forward[name] = module.__dict__.get("forward")
            module.forward = self._make_forward(name, index, module)

    def _make_forward(self, name, index, module):
        def forward(x):
            # [out, in] whatever the storage (GPT-2's Conv1D stores [in, out]): masks, logits and
            # 2:4 groups always run along the input dimension, and F.linear serves both.
            weight = weight_matrix(module)
            if self.mode == "soft":
                seed = noise_seed(self.pruner.name, self.seed, self.step, self.micro, index)
                # through the layer's logits module: sharded logits are gathered only for it
                weight, self.stats[name] = self.logits.layer(name)(
                    lambda tensors: self.pruner.masked_weight(name, index, tensors, weight, seed, self.sched))
            elif self.mode == "hard":
                weight = weight * self.hard[name].to(device=weight.device, dtype=weight.dtype)
            return F.linear(x, weight, module.bias)

        return forward

    def remove(self):
        for name, module in self.modules.items():
            saved = self._saved_forward[name]
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
