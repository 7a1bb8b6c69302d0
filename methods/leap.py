"""LEAP (arXiv 2605.17289, "Learnable End-to-End Adaptive Pruning of Large Language Models").

Every prunable decoder matrix W (q, k, v, o, gate, up, down; not embeddings, not lm_head) gets a
learnable logit matrix P of the same shape.  W is frozen; only P is trained, end to end, on the
language-modelling loss of the masked model.  On every forward a fresh soft mask is sampled with a
binary-concrete (Gumbel-sigmoid) relaxation

    M = sigmoid((alpha * P + L) / tau),   L ~ Logistic(0, 1)

and the layer computes with M * W.  Loss (LEAP.md section 1):

    CE(M * W; x) + lambda_density * |density(M) - target_density|
                 - lambda_weight * (1 - t/T) * sum_l ||M_l * W_l||_F / sum_l ||W_l||_F

with tau and alpha linear in t/T, P initialised around a one-shot Wanda mask (prior strength 3),
AdamW (beta2 0.95, no weight decay), warm-up + cosine learning rate.  The hard mask is P > 0 (the
authors' rule) or, as an option, an exact top-k on P at the target.

The math lives in small pure functions (schedules, sampling, regularisers, prior, final mask) so
it can be tested without a model; `Leap.prune` wires them to a model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from prunebench.errors import UserError
from prunebench.models import all_prunable, is_conv1d, resolve_dtype, restore_prunable, snapshot_prunable
from prunebench.progress import progress_bar
from prunebench.registry import Capabilities, Pruner, PruneReport, register
from prunebench.sparsity import SparsitySpec, mask_from_scores, n_to_prune

FINAL_MASK_RULES = ("sign", "topk")
CHECKPOINT_FILE = "leap_state.pt"
CHECKPOINT_VERSION = 1
# u ~ U[0, 1) is clamped to [eps, 1 - eps] before the logit, so the logistic noise stays finite.
NOISE_EPS = 1e-6
# The sign rule's achieved sparsity may drift from the target (no projection); warn beyond this.
SPARSITY_WARN_POINTS = 0.005

# Hyperparameters of each preset.  A field the user leaves as None is filled from the preset.
PRESETS = {
    # The paper's budget: 2000 steps x 256 sequences x 4096 tokens (about 2.1 B tokens), bf16,
    # gradient checkpointing; schedules and loss weights are the authors' defaults.
    "paper": dict(steps=2000, batch_size=256, seqlen=4096, grad_accum=64, lr=1e-3, beta2=0.95, weight_decay=0.0,
                  warmup_steps=5, lr_schedule="cosine", tau_start=4.0, tau_end=0.05, alpha_start=25.0,
                  alpha_end=350.0, lambda_density=7.0, lambda_weight=10.0, prior_strength=3.0, init_std=0.014,
                  prior_method="wanda", final_mask="sign", logits_dtype="bfloat16", gradient_checkpointing=True,
                  checkpoint_every=50, heldout_windows=16, heldout_every=100),
    # SmolLM2-135M on a 2-core CPU, a few minutes per cell.  LEAP.md section 6: the paper's
    # schedule (tau 4, alpha 25 -> soft masks near 0.5) cannot recover in a short run, so this
    # preset starts colder (tau 1, alpha 100), as measured there.  72 steps of 2 x 256 tokens
    # read 144 distinct windows of the ~198 in the Lee calibration stream (no text repeats);
    # the held-out curve in each record shows what more steps would buy.
    "embedded": dict(steps=72, batch_size=2, seqlen=256, grad_accum=1, lr=1e-3, beta2=0.95, weight_decay=0.0,
                     warmup_steps=5, lr_schedule="cosine", tau_start=1.0, tau_end=0.05, alpha_start=100.0,
                     alpha_end=350.0, lambda_density=7.0, lambda_weight=10.0, prior_strength=3.0, init_std=0.014,
                     prior_method="wanda", final_mask="topk", logits_dtype="float32", gradient_checkpointing=False,
                     checkpoint_every=20, heldout_windows=4, heldout_every=12),
    # A few steps on tiny random models, for unit and conformance tests.
    "tiny": dict(steps=6, batch_size=2, seqlen=32, grad_accum=1, lr=1e-2, beta2=0.95, weight_decay=0.0,
                 warmup_steps=2, lr_schedule="cosine", tau_start=1.0, tau_end=0.05, alpha_start=100.0,
                 alpha_end=350.0, lambda_density=7.0, lambda_weight=10.0, prior_strength=3.0, init_std=0.014,
                 prior_method="wanda", final_mask="sign", logits_dtype="float32", gradient_checkpointing=False,
                 checkpoint_every=0, heldout_windows=2, heldout_every=0),
}


# ---------------------------------------------------------------------------------------------
# Schedules (pure functions of the optimizer step t in [0, T])

def _fraction(step: int, total_steps: int) -> float:
    return min(max(step / max(total_steps, 1), 0.0), 1.0)


def linear_schedule(start: float, end: float, step: int, total_steps: int) -> float:
    """start + (end - start) * t/T: the paper's tau (4 -> 0.05) and alpha (25 -> 350) schedules."""
    return start + (end - start) * _fraction(step, total_steps)


def weight_term_coefficient(lambda_weight: float, step: int, total_steps: int) -> float:
    """lambda_weight * (1 - t/T): the weight-preservation term fades out linearly."""
    return lambda_weight * (1.0 - _fraction(step, total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Sampling and the masked weight

def noise_seed(base_seed: int, step: int, micro: int, layer: int) -> int:
    """A counter-based seed for the logistic noise of one layer in one micro-batch.

    Fresh noise on every forward, yet reproducible from (seed, step, micro-batch, layer) alone:
    a resumed run and a gradient-checkpointing recomputation draw exactly the same masks, and no
    generator state needs saving.
    """
    text = f"leap-noise:{base_seed}:{step}:{micro}:{layer}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def logistic_noise(shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """L ~ Logistic(0, 1) = logit(U), U ~ Uniform(0, 1) (the difference of two Gumbels)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return torch.logit_(u, eps=NOISE_EPS)


def soft_mask(logits: torch.Tensor, noise: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """The binary-concrete sample sigmoid((alpha * P + L) / tau) (reference, allocating version)."""
    return torch.sigmoid((alpha * logits.float() + noise) / tau)


MASK_FLOOR = 1e-12  # sampled gates below this are exactly 0 (see SampledMaskedWeight.forward)


class SampledMaskedWeight(torch.autograd.Function):
    """W_eff = M * W with M = sigmoid((alpha P + L)/tau) sampled inside, plus the two statistics
    the regularisers need (sum of M and ||M * W||_F^2), in one pass over the matrix.

    Only M is saved for backward (in `save_dtype`); the noise and the pre-activation are freed at
    once.  dM/dP = (alpha/tau) M (1 - M).
    """

    @staticmethod
    def forward(ctx, logits, weight, seed, alpha, tau, save_dtype):
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(seed)
        mask = logistic_noise(logits.shape, gen, device=logits.device)  # L, in float32
        mask.add_(logits.float(), alpha=alpha).mul_(1.0 / tau).sigmoid_()  # in place: M
        # Late in training (small tau, large alpha) many gates saturate towards 0; their products
        # and gradients underflow into denormal floats, which slowed CPU steps 5-8x (the worker
        # threads ignore set_flush_denormal).  A gate below MASK_FLOOR contributes < 1e-12 of its
        # weight and gets an exact-zero gradient instead of a denormal one.
        mask.masked_fill_(mask < MASK_FLOOR, 0.0)
        masked = mask.to(weight.dtype).mul_(weight) if weight.dtype != torch.float32 else mask * weight
        mask_sum = mask.sum()
        masked_sq = torch.linalg.vector_norm(masked, dtype=torch.float32).square()
        ctx.save_for_backward(mask.to(save_dtype), weight)
        ctx.scale = alpha / tau
        ctx.logits_dtype = logits.dtype
        return masked, mask_sum, masked_sq

    @staticmethod
    def backward(ctx, grad_masked, grad_sum, grad_sq):
        mask, weight = ctx.saved_tensors
        mask = mask.float()
        w = weight.float()
        # dLoss/dM = g_Weff * W + g_sum + 2 g_sq * M * W^2 = (g_Weff + 2 g_sq M W) * W + g_sum
        if grad_sq is not None and float(grad_sq) != 0.0:
            grad_mask = mask * w
            grad_mask.mul_(2.0 * grad_sq)
            if grad_masked is not None:
                grad_mask.add_(grad_masked.float())
            grad_mask.mul_(w)
        elif grad_masked is not None:
            grad_mask = grad_masked.float() * w
        else:
            grad_mask = torch.zeros_like(mask)
        if grad_sum is not None:
            grad_mask.add_(grad_sum)
        grad_mask.mul_(torch.addcmul(mask, mask, mask, value=-1.0)).mul_(ctx.scale)  # * M(1-M) alpha/tau
        return grad_mask.to(ctx.logits_dtype), None, None, None, None, None


def masked_weight(logits, weight, seed, alpha, tau, save_dtype=torch.float32):
    return SampledMaskedWeight.apply(logits, weight, seed, alpha, tau, save_dtype)


# ---------------------------------------------------------------------------------------------
# Regularisers

def density_penalty(mask_sum: torch.Tensor, n_masked: int, target_density: float) -> torch.Tensor:
    """|density(M) - target|, density = sum of all soft mask entries / number of masked weights
    (one global budget, so per-layer sparsity is free to differ)."""
    return (mask_sum / n_masked - target_density).abs()


def weight_ratio(masked_norms: list, dense_norm_total: float) -> torch.Tensor:
    """sum_l ||M_l * W_l||_F / sum_l ||W_l||_F (the term LEAP subtracts, weighted, from the loss)."""
    return torch.stack(list(masked_norms)).sum() / dense_norm_total


# ---------------------------------------------------------------------------------------------
# Prior and final mask

def prior_logits(keep: torch.Tensor, init_std: float, prior_strength: float, generator: torch.Generator,
                 dtype=torch.float32) -> torch.Tensor:
    """P ~ N(0, init_std^2), then +prior_strength * std(P) where the prior keeps a weight and
    -prior_strength * std(P) where it prunes it."""
    p = torch.randn(keep.shape, generator=generator, dtype=torch.float32) * init_std
    shift = prior_strength * p.std().item() if p.numel() > 1 else prior_strength * init_std
    p += torch.where(keep.cpu(), shift, -shift)
    return p.to(dtype)


def sign_mask(logits: torch.Tensor) -> torch.Tensor:
    """The authors' rule: keep a weight iff P > 0."""
    return logits > 0


def global_topk_masks(logits: dict, target_sparsity: float) -> dict:
    """Keep the N - int(s * N) weights with the largest P over all layers together (the counting
    convention of prunebench.sparsity.n_to_prune).

    Ties at the threshold are filled in a fixed order (layer order, then flat position), so the
    result is deterministic.
    """
    names = list(logits)
    sizes = [logits[n].numel() for n in names]
    total = sum(sizes)
    n_keep = total - n_to_prune(total, target_sparsity)
    if n_keep >= total:
        return {n: torch.ones_like(logits[n], dtype=torch.bool) for n in names}
    if n_keep <= 0:
        return {n: torch.zeros_like(logits[n], dtype=torch.bool) for n in names}
    flat = torch.cat([logits[n].detach().float().flatten().cpu() for n in names])
    threshold = torch.kthvalue(flat, total - n_keep).values  # the largest value that is pruned
    keep = flat > threshold
    missing = n_keep - int(keep.sum())
    if missing > 0:  # ties at the threshold: take the first ones
        ties = (flat == threshold).nonzero().flatten()[:missing]
        keep[ties] = True
    out, offset = {}, 0
    for n, size in zip(names, sizes):
        out[n] = keep[offset:offset + size].view(logits[n].shape).to(logits[n].device)
        offset += size
    return out


def final_masks(logits: dict, rule: str, spec: SparsitySpec) -> dict:
    """The hard masks after training. 'sign': P > 0.  'topk': exact top-k on P at the target,
    over all layers (spec without a scope: LEAP's global budget) or per row / layer if asked."""
    if rule == "sign":
        return {n: sign_mask(p) for n, p in logits.items()}
    if rule == "topk":
        if spec.scope is None:
            return global_topk_masks(logits, spec.target)
        return {n: mask_from_scores(p.float().view(p.shape[0], -1), spec).view(p.shape) for n, p in logits.items()}
    raise UserError(f"unknown final_mask {rule!r}", hint=f"use one of {', '.join(FINAL_MASK_RULES)}")


def mask_sparsity(masks: dict) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


# ---------------------------------------------------------------------------------------------
# Patching the model's linears

class MaskedLinears:
    """Swaps the forward of every prunable linear for one that computes with a mask.

    mode 'soft': a fresh binary-concrete sample per forward (training); 'hard': the current hard
    masks (held-out evaluation); 'off': the dense weights.  The modules' weights are never written
    while patched.
    """

    def __init__(self, modules: dict, logits: dict, save_dtype):
        self.modules, self.logits, self.save_dtype = modules, logits, save_dtype
        self.mode = "off"
        self.alpha = self.tau = 1.0
        self.seed, self.step, self.micro = 0, 0, 0
        self.hard: dict = {}
        self.mask_sums: dict = {}
        self.masked_sq: dict = {}
        self._saved_forward = {}
        for index, (name, module) in enumerate(modules.items()):
            self._saved_forward[name] = module.__dict__.get("forward")
            module.forward = self._make_forward(name, index, module)

    def _make_forward(self, name, index, module):
        conv1d = is_conv1d(module)

        def forward(x):
            weight = module.weight
            if self.mode == "soft":
                seed = noise_seed(self.seed, self.step, self.micro, index)
                weight, msum, msq = masked_weight(self.logits[name], weight, seed, self.alpha, self.tau,
                                                  self.save_dtype)
                # keyed by layer: a checkpointing recomputation overwrites, never double counts
                self.mask_sums[name], self.masked_sq[name] = msum, msq
            elif self.mode == "hard":
                weight = weight * self.hard[name].to(weight.dtype)
            if conv1d:  # GPT-2 Conv1D: weight stored [in, out], y = x @ W + b
                out = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), weight) if module.bias is not None \
                    else x.reshape(-1, x.shape[-1]) @ weight
                return out.view(*x.shape[:-1], weight.shape[-1])
            return F.linear(x, weight, module.bias)

        return forward

    def remove(self):
        for name, module in self.modules.items():
            saved = self._saved_forward[name]
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved


# ---------------------------------------------------------------------------------------------
# The method

@register
class Leap(Pruner):
    name = "leap"
    summary = "learned end-to-end unstructured masks, binary-concrete logits with a Wanda prior (LEAP 2026)"
    capabilities = Capabilities(patterns=("unstructured",), needs_calibration=True, needs_gradients=True)

    @dataclass
    class Config:
        preset: str = "paper"  # fills every field left as None: "paper" | "embedded" | "tiny"
        steps: Optional[int] = None  # optimizer steps T
        batch_size: Optional[int] = None  # sequences per optimizer step (global batch)
        seqlen: Optional[int] = None  # tokens per training sequence
        grad_accum: Optional[int] = None  # micro-batches per step (memory knob; batch_size % grad_accum == 0)
        lr: Optional[float] = None  # AdamW peak learning rate (paper 1e-3)
        beta2: Optional[float] = None  # AdamW beta2 (0.95)
        weight_decay: Optional[float] = None  # AdamW weight decay (0)
        warmup_steps: Optional[int] = None  # linear warm-up steps (5)
        lr_schedule: Optional[str] = None  # "cosine" (paper) | "constant" after warm-up
        tau_start: Optional[float] = None  # temperature, linear in t/T (4.0 -> 0.05)
        tau_end: Optional[float] = None
        alpha_start: Optional[float] = None  # logit scale, linear in t/T (25 -> 350)
        alpha_end: Optional[float] = None
        lambda_density: Optional[float] = None  # weight of |density - target| (7)
        lambda_weight: Optional[float] = None  # weight of the kept-weight-norm term (10, decays to 0)
        prior_strength: Optional[float] = None  # prior shift in units of std(P) (3)
        init_std: Optional[float] = None  # std of the initial logits (0.014)
        prior_method: Optional[str] = None  # registered method whose one-shot mask is the prior ("wanda")
        final_mask: Optional[str] = None  # "sign" (P > 0, the authors' rule) | "topk" (exact, at the target)
        logits_dtype: Optional[str] = None  # dtype of P and its AdamW state: "float32" | "bfloat16"
        gradient_checkpointing: Optional[bool] = None  # recompute block activations in backward
        checkpoint_every: Optional[int] = None  # save a resumable state to ctx.work_dir every N steps (0: never)
        heldout_windows: Optional[int] = None  # training-stream windows kept out for a held-out loss
        heldout_every: Optional[int] = None  # evaluate the held-out loss of the hard mask every N steps (0: start/end)
        dataset: Optional[str] = None  # training stream; None: the cell's calibration dataset

        def __post_init__(self):
            if self.preset not in PRESETS:
                raise UserError(f"unknown LEAP preset {self.preset!r}", hint=f"use one of {', '.join(PRESETS)}")
            for key, value in PRESETS[self.preset].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
            if self.final_mask not in FINAL_MASK_RULES:
                raise UserError(f"unknown final_mask {self.final_mask!r}", hint=f"use one of {', '.join(FINAL_MASK_RULES)}")
            if self.lr_schedule not in ("cosine", "constant"):
                raise UserError(f"unknown lr_schedule {self.lr_schedule!r}", hint="use cosine or constant")
            resolve_dtype(self.logits_dtype)
            if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
                raise UserError(f"LEAP needs steps >= 1 and batch_size ({self.batch_size}) divisible by grad_accum "
                                f"({self.grad_accum})", hint="e.g. batch_size=256 grad_accum=64")
            if self.tau_start <= 0 or self.tau_end <= 0:
                raise UserError("tau must stay positive", hint="e.g. tau_start=4 tau_end=0.05")

    def uses_methods(self) -> tuple:
        return (self.config.prior_method,) if self.config.prior_method else ()

    # -- helpers --------------------------------------------------------------------------------

    def schedule(self, step: int) -> dict:
        c, T = self.config, self.config.steps
        return {"tau": linear_schedule(c.tau_start, c.tau_end, step, T),
                "alpha": linear_schedule(c.alpha_start, c.alpha_end, step, T),
                "lambda_weight": weight_term_coefficient(c.lambda_weight, step, T),
                "lr": c.lr * lr_factor(step, T, c.warmup_steps, c.lr_schedule)}

    def prior_masks(self, model, modules: dict, ctx) -> dict:
        """Keep-masks of the one-shot prior at the target; the dense weights are restored after.

        Weights that were exactly zero before score 0 under Wanda, so counting them as pruned
        (weight == 0 afterwards) is what Wanda itself would choose.
        """
        if ctx.registry is None:
            from prunebench import registry as reg
        else:
            reg = ctx.registry
        snapshot = snapshot_prunable(model)
        prior = reg.create(self.config.prior_method)
        try:
            prior.prune(model, dataclasses.replace(ctx, progress=False))
            keep = {name: (m.weight.detach() != 0) for name, m in modules.items()}
        finally:
            restore_prunable(model, snapshot)
        return keep

    def training_windows(self, ctx):
        from prunebench.data import stream_windows

        c = self.config
        dataset = c.dataset or ctx.calibration_dataset
        if ctx.tokenizer is None:
            raise UserError("LEAP draws its own training stream and needs the tokenizer in the context",
                            hint="the runner passes it; in scripts set PruneContext(tokenizer=...)")
        windows, fingerprint = stream_windows(ctx.tokenizer, dataset, c.seqlen, ctx.data_dir)
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(len(windows), generator=gen)
        n_heldout = min(c.heldout_windows, max(len(windows) - c.batch_size, 0))
        heldout = windows[order[:n_heldout]]
        train = windows[order[n_heldout:]]
        return dataset, train, heldout, fingerprint

    # -- the loop -------------------------------------------------------------------------------

    def prune(self, model, ctx) -> PruneReport:
        # As tau falls the sampled masks saturate: M(1 - M) and the AdamW second moments underflow
        # into denormal floats, which x86 CPUs process ~10x slower (measured here: steps went from
        # 3.5 s to 27 s).  Flushing them to zero (this thread; see also MASK_FLOOR) changes nothing
        # that matters numerically.
        flushed = torch.set_flush_denormal(True)
        try:
            return self._prune(model, ctx)
        finally:
            if flushed:
                torch.set_flush_denormal(False)  # the process default

    def _prune(self, model, ctx) -> PruneReport:
        self.check_spec(ctx.sparsity)
        c = self.config
        spec = ctx.sparsity
        report = PruneReport(stats={"config": dataclasses.asdict(c), "scope": spec.scope or "global"})
        modules = all_prunable(model)
        device = torch.device(ctx.device)
        logits_dtype = resolve_dtype(c.logits_dtype)
        target_density = 1.0 - spec.target
        n_masked = sum(m.weight.numel() for m in modules.values())
        t_start = time.perf_counter()

        dataset, train, heldout, fingerprint = self.training_windows(ctx)
        report.stats.update(dataset=dataset, train_windows=len(train), heldout_windows=len(heldout),
                            stream_fingerprint=fingerprint, n_masked=n_masked)
        micro_size = c.batch_size // c.grad_accum
        if len(train) < c.batch_size:
            raise UserError(f"the {dataset} training stream has {len(train)} windows of {c.seqlen}, fewer than one "
                            f"batch of {c.batch_size}", hint="use a shorter seqlen or a larger dataset")
        windows_needed = c.steps * c.batch_size
        if windows_needed > len(train):
            report.warnings.append(f"LEAP: {c.steps} steps x {c.batch_size} sequences need {windows_needed} windows but the "
                                   f"{dataset} stream has {len(train)}: the text repeats "
                                   f"{windows_needed / len(train):.1f} times (risk of overfitting, LEAP.md section 6)")

        state_path = Path(ctx.work_dir) / CHECKPOINT_FILE if ctx.work_dir and c.checkpoint_every else None
        run_key = self._run_key(ctx, modules, fingerprint)
        resumed = self._load_state(state_path, run_key, report)

        # Logits: from the checkpoint, or from the one-shot prior.
        if resumed is None:
            t0 = time.perf_counter()
            keep = self.prior_masks(model, modules, ctx)
            report.stats["prior_s"] = round(time.perf_counter() - t0, 3)
            report.stats["prior_sparsity"] = mask_sparsity(keep)
            gen = torch.Generator().manual_seed(ctx.seed)
            logits = {name: prior_logits(keep[name], c.init_std, c.prior_strength, gen, logits_dtype).to(device)
                      for name in modules}
            del keep
        else:
            logits = {name: resumed["logits"][name].to(device=device, dtype=logits_dtype) for name in modules}
        params = [nn.Parameter(logits[name]) for name in modules]
        logits = dict(zip(modules, params))

        optimizer = make_adamw(params, c)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, c.steps, c.warmup_steps, c.lr_schedule))
        curves = {"step": [], "loss": [], "ce": [], "density": [], "tau": [], "alpha": [],
                  "heldout_step": [], "heldout_loss": [], "heldout_ppl": [], "heldout_sparsity": []}
        start_step = 0
        if resumed is not None:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            curves = resumed["curves"]
            start_step = resumed["step"]
            report.stats["resumed_from_step"] = start_step

        # Freeze everything; only the logits learn.  Restore the flags afterwards.
        grad_flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        was_training = model.training
        checkpointing = bool(c.gradient_checkpointing) and enable_checkpointing(model)
        if checkpointing:
            model.train()  # transformers checkpoints only in training mode
        else:
            model.eval()  # no dropout: the only randomness is the mask noise
        dense_norm_total = sum(float(torch.linalg.vector_norm(m.weight.detach().float())) for m in modules.values())
        patch = MaskedLinears(modules, logits, save_dtype=logits_dtype if logits_dtype != torch.float32 else torch.float32)
        patch.seed = ctx.seed
        bar = progress_bar(total=c.steps, desc=f"leap {spec.label}", enabled=ctx.progress, unit="step")
        bar.update(start_step)
        try:
            if resumed is None:
                self._heldout(model, patch, heldout, spec, 0, curves, micro_size, device, label="prior")
                if curves["heldout_loss"]:
                    report.stats["prior_heldout_loss"] = curves["heldout_loss"][0]
                    report.stats["prior_heldout_ppl"] = curves["heldout_ppl"][0]
            for step in range(start_step, c.steps):
                sched = self.schedule(step)
                patch.mode, patch.step = "soft", step
                patch.alpha, patch.tau = sched["alpha"], sched["tau"]
                optimizer.zero_grad(set_to_none=True)
                batch_ids = self._batch(train, step, ctx.seed)
                step_loss = step_ce = step_density = 0.0
                for micro in range(c.grad_accum):
                    patch.micro = micro
                    ids = batch_ids[micro * micro_size:(micro + 1) * micro_size].to(device)
                    patch.mask_sums.clear()
                    patch.masked_sq.clear()
                    out = model(input_ids=ids, use_cache=False)
                    ce = _lm_loss(out.logits, ids)
                    mask_sum = torch.stack([patch.mask_sums[n] for n in modules]).sum()
                    density_term = density_penalty(mask_sum, n_masked, target_density)
                    weight_term = weight_ratio([patch.masked_sq[n].sqrt() for n in modules], dense_norm_total)
                    loss = ce + c.lambda_density * density_term - sched["lambda_weight"] * weight_term
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"LEAP: non-finite loss {loss.item()} at step {step} "
                                                 f"(micro-batch {micro}; ce {ce.item()})")
                    (loss / c.grad_accum).backward()
                    step_loss += loss.item() / c.grad_accum
                    step_ce += ce.item() / c.grad_accum
                    step_density += mask_sum.item() / n_masked / c.grad_accum
                del out, loss, ce, mask_sum, density_term, weight_term
                patch.mask_sums.clear()
                patch.masked_sq.clear()
                optimizer.step()
                scheduler.step()
                for name, value in (("step", step), ("loss", step_loss), ("ce", step_ce), ("density", step_density),
                                    ("tau", sched["tau"]), ("alpha", sched["alpha"])):
                    curves[name].append(round(value, 6) if isinstance(value, float) else value)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", density=f"{step_density:.3f}", tau=f"{sched['tau']:.2f}",
                                alpha=f"{sched['alpha']:.0f}")
                done = step + 1
                if c.heldout_every and done % c.heldout_every == 0 and done < c.steps:
                    self._heldout(model, patch, heldout, spec, done, curves, micro_size, device)
                if state_path is not None and done % c.checkpoint_every == 0 and done < c.steps:
                    self._save_state(state_path, run_key, logits, optimizer, scheduler, done, curves)
            patch.mode = "off"
            masks = final_masks({n: p.detach() for n, p in logits.items()}, c.final_mask, spec)
            self._heldout(model, patch, heldout, spec, c.steps, curves, micro_size, device, masks=masks)
        finally:
            bar.close()
            patch.remove()
            if checkpointing:
                disable_checkpointing(model)
            model.train(was_training)
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)

        # Apply the hard mask to the weights in place: the runner measures sparsity from them.
        with torch.no_grad():
            for name, module in modules.items():
                module.weight.mul_(masks[name].to(module.weight.dtype))
        achieved = mask_sparsity(masks)
        # what the authors' P > 0 rule would give, whichever rule was used (LEAP.md: not reported there)
        report.stats["sign_rule_sparsity"] = 1.0 - sum(int((p > 0).sum()) for p in params) / n_masked
        per_layer = {name: round(1.0 - m.float().mean().item(), 6) for name, m in masks.items()}
        report.stats.update(curves=curves, achieved_sparsity=achieved, final_mask=c.final_mask, steps=c.steps,
                            tokens_seen=(c.steps - start_step) * c.batch_size * c.seqlen,
                            train_s=round(time.perf_counter() - t_start, 3),
                            logits_bytes=sum(p.numel() * p.element_size() for p in params),
                            per_layer_sparsity=per_layer)
        if curves["heldout_loss"]:
            report.stats["heldout_loss"] = curves["heldout_loss"][-1]
            report.stats["heldout_ppl"] = curves["heldout_ppl"][-1]
        if abs(achieved - spec.target) > SPARSITY_WARN_POINTS:
            report.warnings.append(f"LEAP {c.final_mask} rule: achieved sparsity {achieved:.4f} is "
                                   f"{100 * abs(achieved - spec.target):.2f} points off the target {spec.target:g} "
                                   f"(final_mask='topk' projects exactly)")
        if state_path is not None and state_path.exists():
            state_path.unlink()  # the finished result is in the weights; a stale state must not resume
        del optimizer, params, logits
        return report

    # -- pieces of the loop ---------------------------------------------------------------------

    def _batch(self, train: torch.Tensor, step: int, seed: int) -> torch.Tensor:
        """The sequences of optimizer step `step`: consecutive slices of a seeded permutation of
        the whole stream, reshuffled (seed, epoch) when it runs out; a pure function of the step."""
        bs = self.config.batch_size
        n = len(train)
        per_epoch = n // bs
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return train[order[index * bs:(index + 1) * bs]]

    @torch.no_grad()
    def _heldout(self, model, patch, heldout, spec, step, curves, micro_size, device, masks=None, label=None):
        """Mean next-token loss of the current hard mask on the held-out windows."""
        if len(heldout) == 0:
            return
        patch.hard = masks if masks is not None else final_masks(
            {n: p.detach() for n, p in patch.logits.items()}, self.config.final_mask, spec)
        patch.mode = "hard"
        total, count = 0.0, 0
        for start in range(0, len(heldout), max(micro_size, 1)):
            ids = heldout[start:start + micro_size].to(device)
            out = model(input_ids=ids, use_cache=False)
            n_tok = ids[:, 1:].numel()
            total += _lm_loss(out.logits, ids).item() * n_tok
            count += n_tok
        loss = total / count
        curves["heldout_step"].append(step)
        curves["heldout_loss"].append(round(loss, 6))
        curves["heldout_ppl"].append(round(math.exp(min(loss, 700.0)), 4))
        curves["heldout_sparsity"].append(round(mask_sparsity(patch.hard), 6))
        patch.hard = {}
        patch.mode = "off"

    def _run_key(self, ctx, modules, fingerprint) -> str:
        """What a checkpoint must match to be resumed: config, target, seed, data, model shapes."""
        key = {"v": CHECKPOINT_VERSION, "config": dataclasses.asdict(self.config), "sparsity": ctx.sparsity.to_dict(),
               "seed": ctx.seed, "stream": fingerprint,
               "shapes": [[n, list(m.weight.shape)] for n, m in modules.items()]}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _save_state(self, path: Path, run_key, logits, optimizer, scheduler, step, curves) -> None:
        """Atomic: write a temp file, then os.replace.  The noise and data order are counter-based
        functions of (seed, step), so no generator state is needed beyond the step."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"run_key": run_key, "step": step, "logits": {n: p.detach().cpu() for n, p in logits.items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "curves": curves,
                 "torch_rng": torch.get_rng_state()}
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load_state(self, path: Optional[Path], run_key, report):
        if path is None or not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a damaged checkpoint is not trusted
            report.warnings.append(f"LEAP: ignored unreadable checkpoint {path} ({exc})")
            return None
        if state.get("run_key") != run_key:
            report.warnings.append(f"LEAP: ignored checkpoint {path} from a different run (config, data or seed differ)")
            return None
        torch.set_rng_state(state["torch_rng"])
        return state


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


def make_adamw(params, c):
    """AdamW (beta2 0.95, no weight decay); the fused kernel where available (one pass per
    tensor instead of several: the update touches every logit and both moments)."""
    kwargs = dict(lr=c.lr, betas=(0.9, c.beta2), weight_decay=c.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
