"""MaskLLM (Fang et al., NeurIPS 2024, "MaskLLM: Learnable Semi-Structured Sparsity for LLMs").

Weights frozen.  Every group of M consecutive inputs of a row has logits over the C(M, N)
patterns that keep N of them (2:4: 6 patterns).  A training forward samples a soft choice

    y = softmax((kappa * P + G) / tau),  G ~ Gumbel(0, 1)   (soft, not straight-through;
                                                             G = -log(-log U), U prunebench.engines.concrete's
                                                             counter noise, drawn in the fused pass)
    mask = y @ C                                             (C: the K x M pattern table)

and the layer computes with mask * W.  Loss = CE - lambda * (1 - t/T) * sum_l ||W_l * mask_l||_F^2
(squared, not normalised).  kappa 100 -> 500 and tau 4 -> 0.05, linear (the values of the
authors' LLaMA-2 training script; its argparse defaults differ).  Logits start at N(0, 0.01^2)
and are shifted towards a one-shot prior: P += (overlap - 1) * std(P) * 3, overlap = kept
positions a pattern shares with the prior's (SparseGPT's mask at N:M, dampening 0.1, weights
left dense).  AdamW on the logits, lr 5e-5 x 10, cosine to a tenth, no warm-up, weight decay
0.1, betas (0.9, 0.95), clipping 1.0.  The final mask is each group's argmax pattern, so the
result is exactly N:M.  (Facts: ../shared/METHODS.md section 1.)

Refused: an N:M with more than MAX_PATTERNS patterns (4:8 has 70 logits per 8 weights, about
9 floats of logits and Adam state per weight), and a linear whose input width is not a multiple
of M (a trailing short group has no pattern table).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from prunebench.errors import UserError
from prunebench.engines.fused_masks import pattern_masked_weight as fused_pattern_masked_weight
from prunebench.engines.masklearn import LearnedMaskPruner
from prunebench.engines.masklearn_config import MaskTrainingConfig, fading, linear_schedule, lr_factor
from prunebench.contract import Capabilities
from prunebench.registry import register
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.modeling.models import weight_matrix

# C(M, N) above this is refused: logits and their Adam state grow as C(M, N) / M floats per weight.
MAX_PATTERNS = 35

PRESETS = {
    # The authors' LLaMA-2 script: 2000 iterations x 256 x 4096 tokens of C4, bf16; C4 streamed
    # as unique windows.
    "paper": dict(steps=2000, batch_size=256, seqlen=4096, grad_accum=64, streaming=True, dataset="c4", lr=5e-4, beta2=0.95, weight_decay=0.1,
                  warmup_steps=0, lr_schedule="cosine", lr_final_ratio=0.1, grad_clip=1.0, init_std=0.01,
                  prior_strength=3.0, prior_method="sparsegpt", prior_config={"percdamp": 0.1}, tau_start=4.0,
                  tau_end=0.05, kappa_start=100.0, kappa_end=500.0, lambda_weight=1e-5, logits_dtype="bfloat16",
                  gradient_checkpointing=True, checkpoint_every=50, heldout_windows=16, heldout_every=100),
    # SmolLM2-135M on a 2-core CPU, the same budget as LEAP's embedded preset (72 steps of
    # 2 x 256 tokens).  Colder start (tau 1): at tau 4 the prior's pattern gets under a third
    # of the probability and a short run cannot sharpen it (LEAP.md section 6 found the same).
    "embedded": dict(steps=72, batch_size=2, seqlen=256, grad_accum=1, lr=5e-4, beta2=0.95, weight_decay=0.1,
                     warmup_steps=0, lr_schedule="cosine", lr_final_ratio=0.1, grad_clip=1.0, init_std=0.01,
                     prior_strength=3.0, prior_method="sparsegpt", prior_config={"percdamp": 0.1}, tau_start=1.0,
                     tau_end=0.05, kappa_start=100.0, kappa_end=500.0, lambda_weight=1e-5, logits_dtype="float32",
                     gradient_checkpointing=False, checkpoint_every=20, heldout_windows=4, heldout_every=12),
    # A few steps on tiny random models, for unit and conformance tests.
    "tiny": dict(steps=6, batch_size=2, seqlen=32, grad_accum=1, lr=1e-2, beta2=0.95, weight_decay=0.1,
                 warmup_steps=0, lr_schedule="cosine", lr_final_ratio=0.1, grad_clip=1.0, init_std=0.01,
                 prior_strength=3.0, prior_method="sparsegpt", prior_config={"percdamp": 0.1}, tau_start=1.0,
                 tau_end=0.05, kappa_start=100.0, kappa_end=500.0, lambda_weight=1e-5, logits_dtype="float32",
                 gradient_checkpointing=False, checkpoint_every=0, heldout_windows=2, heldout_every=0),
}


# ---------------------------------------------------------------------------------------------
# The N:M categorical (shared with PATCH)

def nm_patterns(n: int, m: int) -> torch.Tensor:
    """[C(m, n), m] float table of the patterns that keep n of m, in lexicographic order."""
    rows = []
    for kept in itertools.combinations(range(m), n):
        row = [0.0] * m
        for j in kept:
            row[j] = 1.0
        rows.append(row)
    return torch.tensor(rows)


def group_view(matrix: torch.Tensor, m: int) -> torch.Tensor:
    """[out, in] -> [out * in / m, m]: the groups of m consecutive inputs of each row."""
    return matrix.reshape(-1, m)


def prior_overlap(keep: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """[groups, K]: how many kept positions each pattern shares with the prior's keep-mask."""
    return group_view(keep.float(), patterns.shape[1]) @ patterns.t()


def pattern_prior_logits(keep: torch.Tensor, patterns: torch.Tensor, init_std: float, prior_strength: float,
                         generator: torch.Generator) -> torch.Tensor:
    """MaskLLM's init: P ~ N(0, init_std^2), then P += (overlap - 1) * std(P) * prior_strength."""
    overlap = prior_overlap(keep, patterns)
    p = torch.randn(overlap.shape, generator=generator) * init_std
    return p + (overlap - 1.0) * (p.std().item() * prior_strength)


def soft_pattern_mask(logits: torch.Tensor, noise: torch.Tensor, patterns: torch.Tensor, kappa: float,
                      tau: float, shape) -> torch.Tensor:
    """softmax((kappa P + G) / tau) @ C as an [out, in] soft mask (reference, allocating version)."""
    y = torch.softmax((kappa * logits.float() + noise) / tau, dim=-1)
    return (y @ patterns).view(shape)


def argmax_pattern_mask(logits: torch.Tensor, patterns: torch.Tensor, shape) -> torch.Tensor:
    """The final rule: each group takes its most likely pattern (ties: the first), so exactly N:M."""
    return patterns[logits.float().argmax(dim=-1)].bool().view(shape)


def pattern_masked_weight(logits, weight, patterns, seed, kappa, tau):
    """(softmax((kappa P + G)/tau) @ C) * W and ||that||_F^2, G drawn from the counter noise of `seed`
    inside one fused pass (prunebench.engines.fused_masks: nothing saved but the inputs, backward
    recomputes)."""
    masked, _, masked_sq = fused_pattern_masked_weight(logits, weight, patterns, seed, kappa, tau)
    return masked, masked_sq


def check_nm_learnable(spec: SparsitySpec, who: str) -> None:
    """N:M patterns a categorical over C(M, N) choices can learn; one clear line otherwise."""
    if spec.pattern != "nm" or spec.n < 1:
        raise UserError(f"{who} learns N:M masks with N >= 1, not {spec.pattern_name}", hint="e.g. 2:4")
    count = math.comb(spec.m, spec.n)
    if count > MAX_PATTERNS:
        raise UserError(f"{who}: {spec.pattern_name} has {count} patterns per group, more than {MAX_PATTERNS} "
                        f"(logits and their Adam state would take {count / spec.m:.1f} floats per weight)",
                        hint="use 2:4, 1:4, 2:8 or another N:M with few patterns")


def check_widths(modules: dict, m: int, who: str) -> None:
    bad = [name for name, mod in modules.items() if weight_matrix(mod).shape[1] % m]
    if bad:
        raise UserError(f"{who}: {bad[0]} has an input width not divisible by {m} ({len(bad)} linears)",
                        hint="an N:M group needs M consecutive inputs")


# ---------------------------------------------------------------------------------------------
# The method

@register
class MaskLLM(LearnedMaskPruner):
    name = "maskllm"
    display = "MaskLLM"
    summary = "learned N:M (2:4) masks, Gumbel-softmax over each group's patterns with a SparseGPT prior (MaskLLM 2024)"
    capabilities = Capabilities(patterns=("nm",), needs_calibration=True, needs_gradients=True)
    logged_schedule = ("tau", "kappa")
    engine_modules = ("prunebench.engines.fused_masks", "prunebench.engines.concrete")  # the fused pass decides the draws too

    @dataclass
    class Config(MaskTrainingConfig):
        PRESETS = PRESETS

        prior_config: Optional[dict] = None  # config of the prior method (SparseGPT, dampening 0.1)
        tau_start: Optional[float] = None  # Gumbel-softmax temperature, linear (4 -> 0.05)
        tau_end: Optional[float] = None
        kappa_start: Optional[float] = None  # logit scale, linear (100 -> 500)
        kappa_end: Optional[float] = None
        lambda_weight: Optional[float] = None  # weight of -sum ||W * mask||_F^2, fading to 0 (1e-5)

        def validate(self):
            if self.tau_start <= 0 or self.tau_end <= 0:
                raise UserError("tau must stay positive", hint="e.g. tau_start=4 tau_end=0.05")

    def check_spec(self, spec: SparsitySpec) -> None:
        check_nm_learnable(spec, self.display)

    def schedule(self, step: int) -> dict:
        c, T = self.config, self.config.steps
        return {"tau": linear_schedule(c.tau_start, c.tau_end, step, T),
                "kappa": linear_schedule(c.kappa_start, c.kappa_end, step, T),
                "lambda_weight": fading(c.lambda_weight, step, T),
                "lr": c.lr * lr_factor(step, T, c.warmup_steps, c.lr_schedule, c.lr_final_ratio)}

    def init_logits(self, model, modules, ctx, report) -> dict:
        c, spec = self.config, ctx.sparsity
        check_widths(modules, spec.m, self.display)
        keep = self.one_shot_masks(model, modules, ctx, c.prior_method, spec, c.prior_config)
        patterns = nm_patterns(spec.n, spec.m)
        gen = torch.Generator().manual_seed(ctx.seed)
        return {name: {"P": pattern_prior_logits(keep[name], patterns, c.init_std, c.prior_strength, gen)}
                for name in modules}

    def begin(self, modules, spec) -> None:
        device = next(iter(modules.values())).weight.device
        self._patterns = nm_patterns(spec.n, spec.m).to(device)
        self._shapes = {name: tuple(weight_matrix(m).shape) for name, m in modules.items()}

    def masked_weight(self, layer, index, logits, weight, seed, sched):
        w, msq = pattern_masked_weight(logits["P"], weight, self._patterns, seed, sched["kappa"], sched["tau"])
        return w, {"masked_sq": msq}

    def regularisers(self, stats, sched):
        kept_sq = torch.stack([s["masked_sq"] for s in stats.values()]).sum()
        return [-(sched["lambda_weight"] * kept_sq)], {}

    def hard_masks(self, logits, spec) -> dict:
        patterns = self._patterns.to(next(iter(logits.values()))["P"].device)
        return {name: argmax_pattern_mask(ps["P"], patterns, self._shapes[name]) for name, ps in logits.items()}

    def uses_methods(self) -> tuple:
        return (self.config.prior_method,)

    def logits_per_weight(self, spec) -> float:
        return math.comb(spec.m, spec.n) / spec.m  # one logit per pattern of each group of M
