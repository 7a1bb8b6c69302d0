"""PATCH (Hourri, Mozaffari, Mehri Dehnavi, arXiv 2509.23410): every tile dense or 2:4, learned.

Weights frozen.  Each decoder linear is cut into b x b tiles (the spec's tile size: hybrid:0.35/64).
A tile logit P_t per tile gives the tile gate T = GumbelSoftmax([0, kappa_t P_t], tau_t)[1], which
is the binary concrete sigmoid((kappa_t P_t + L) / tau_t) with L ~ Logistic(0, 1), broadcast over
the tile.  Inside, the 2:4 choice is MaskLLM's categorical: S = softmax((kappa_g P_g + G) / tau_g) @ C.
The combined mask M = T + (1 - T) * S (a dense tile keeps everything).  Both noises are counter-
based (prunebench.engines.concrete's hash of (seed, element); the tiles on a stream of their own), and in
joint mode the 2:4 sample, the tiles and M * W run as one fused pass (prunebench.engines.fused_masks).  Loss:

    CE + (lambda_density / ga) * |sum M / sum N - rho|
       - (lambda_weight / ga) * (1 - t/T) * sum ||M * W||_F / sum ||W||_F

with sums over all layers (one soft budget: a per-layer budget did worse in the paper), rho the
target density and ga the gradient-accumulation steps (the authors scale both terms by 1 / ga).

Priors (strength 3): tiles from an unstructured one-shot mask at the target, each tile scored by
its kept fraction, the top round(n_tiles * (2 rho - 1)) of each layer +1 and the rest -1, added
to N(0, 0.014^2) logits in units of their std; the 2:4 logits *replaced* by (overlap - 1) * std * 3
with the one-shot 2:4 mask (or, group_init="add", MaskLLM's noise + prior, the embedded
preset's).  Modes: joint (tiles and 2:4 learned together) and tile (the 2:4 masks frozen from a
one-shot method or a MaskLLM result; only tiles learn).  Final mask: a tile is
dense iff P_t > 0 (the authors' rule) or, as an option, the exact number of 2:4 tiles that meets
the target; each group takes its argmax pattern.  Effective sparsity = 0.5 x (fraction of
weights in 2:4 tiles).  (Facts: ../shared/METHODS.md section 2.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from prunebench.errors import UserError
from prunebench.engines.concrete import counter_logistic
from prunebench.engines.fused_masks import combine, pattern_mask_torch, pattern_masked_weight
from prunebench.engines.masklearn import LearnedMaskPruner
from prunebench.engines.masklearn_config import MaskTrainingConfig, fading, linear_schedule, lr_factor
from prunebench.methods.maskllm import (argmax_pattern_mask, check_widths, nm_patterns, pattern_prior_logits,
                                       prior_overlap)
from prunebench.modeling.models import weight_matrix
from prunebench.contract import Capabilities
from prunebench.registry import register
from prunebench.sparsity.patterns import SparsitySpec, expand_tiles, tile_sums

MODES = ("joint", "tile")
GROUP_INITS = ("replace", "add")
FINAL_MASK_RULES = ("sign", "topk")
TILE_NOISE_KEY = 0x2545F4914F6CDD1D  # xor-ed into a layer's noise seed: the tile gates' own stream
SPARSITY_WARN_POINTS = 0.005

_COMMON = dict(beta2=0.95, weight_decay=0.0, warmup_steps=5, lr_schedule="cosine", lr_final_ratio=0.0, grad_clip=1.0,
               init_std=0.014, prior_strength=3.0, prior_method="sparsegpt", prior_config=None, frozen_method=None,
               frozen_config=None, group_init="replace", tile_tau_start=4.0, tile_tau_end=0.05, group_tau_start=4.0,
               group_tau_end=0.05, group_kappa_start=100.0, group_kappa_end=500.0)
# The LEAP authors' protocol (their PATCH code): one mask draw per sequence (4 GPUs x 64
# accumulation steps = 256 micro-batches of one), unique SlimPajama-6B windows streamed.
_PAPER = dict(steps=2000, batch_size=256, seqlen=4096, grad_accum=256, streaming=True, dataset="slimpajama",
              logits_dtype="bfloat16",
              gradient_checkpointing=True, checkpoint_every=50, heldout_windows=16, heldout_every=100, final_mask="sign")
PRESETS = {
    # Joint mode, the authors' 0.5-1B setting: AdamW lr 1e-3, beta2 0.95, cosine with 5 warm-up
    # steps; tiles kappa 25 -> 350, 2:4 kappa 100 -> 500, tau 4 -> 0.05 for both; 2000 steps x
    # 256 x 4096 tokens, bf16.
    "paper": dict(_COMMON, **_PAPER, mode="joint", lr=1e-3, tile_kappa_start=25.0, tile_kappa_end=350.0,
                  lambda_density=7.0, lambda_weight=10.0),
    # Tile mode, the authors' 7-8B setting (2:4 masks frozen): lr 1e-4, tiles kappa 100 -> 500,
    # lambda1 3, lambda2 0.1.
    "paper-tile": dict(_COMMON, **_PAPER, mode="tile", lr=1e-4, tile_kappa_start=100.0, tile_kappa_end=500.0,
                       lambda_density=3.0, lambda_weight=0.1),
    # SmolLM2-135M on a 2-core CPU, 72 steps of 2 x 256 tokens; a colder start (tau 1) as for
    # LEAP (LEAP.md section 6, METHODS.md section 2: short budgets start cold); the exact tile
    # count at the end so the cell meets its target.  Tile kappa starts at 100 as LEAP's alpha
    # does here: at the paper's 25 the prior's tile logits (+-3 std = +-0.042) give gates of
    # sigmoid(+-1 + noise), about half open, so the soft density started at 0.68 against a 0.55
    # target at 45% and the run spent its steps closing tiles (measured: held-out 126.8 -> 108.8,
    # Lee PPL 98.65, above MaskLLM 2:4's 67.39).  At 100 the gates start at the prior's choice.
    # The 2:4 logits start as MaskLLM's do (noise + prior, group_init="add"): from the authors'
    # noise-free start every group's prior pattern leads by exactly 0.042, and at lr 1e-3 no
    # argmax moved for ~40 of the 72 steps (held-out 126.8 -> 125.8 at step 36; Lee PPL 100.73 at
    # 45%); with the noise near-tied groups move at once (measured at 45%: Lee PPL 59.93).
    "embedded": dict(_COMMON, steps=72, batch_size=2, seqlen=256, grad_accum=1, logits_dtype="float32",
                     gradient_checkpointing=False, checkpoint_every=20, heldout_windows=4, heldout_every=12,
                     final_mask="topk", mode="joint", lr=1e-3, tile_kappa_start=100.0, tile_kappa_end=350.0,
                     lambda_density=7.0, lambda_weight=10.0, tile_tau_start=1.0, group_tau_start=1.0,
                     group_init="add"),
    "tiny": dict(_COMMON, steps=6, batch_size=2, seqlen=32, grad_accum=1, logits_dtype="float32",
                 gradient_checkpointing=False, checkpoint_every=0, heldout_windows=2, heldout_every=0,
                 final_mask="topk", mode="joint", lr=1e-2, warmup_steps=2, tile_kappa_start=25.0,
                 tile_kappa_end=350.0, lambda_density=7.0, lambda_weight=10.0, tile_tau_start=1.0,
                 group_tau_start=1.0),
}


# ---------------------------------------------------------------------------------------------
# Tiles (pure functions)

def tile_noise_seed(seed: int) -> int:
    """The seed of the tile gates' noise: another stream than the 2:4 logits' (same counters)."""
    return (seed ^ TILE_NOISE_KEY) & ((1 << 63) - 1)


def group_prior_logits(keep: torch.Tensor, patterns: torch.Tensor, init_std: float, prior_strength: float, rule: str,
                       generator: torch.Generator) -> torch.Tensor:
    """The 2:4 logits' start from a one-shot 2:4 mask.  "replace" (the authors' PATCH code):
    (overlap - 1) * init_std * strength, no noise, so every group's prior pattern leads each rival
    by the same margin and no argmax moves until the gradients have closed it.  "add" (MaskLLM's
    rule): N(0, init_std^2) plus the same prior in units of the draw's std, so near-tied groups
    can move at once."""
    if rule == "add":
        return pattern_prior_logits(keep, patterns, init_std, prior_strength, generator)
    return (prior_overlap(keep, patterns) - 1.0) * (init_std * prior_strength)


def tile_prior(keep: torch.Tensor, tile: int, density: float) -> torch.Tensor:
    """+1 for the round(n_tiles * (2 rho - 1)) tiles with the largest kept fraction under an
    unstructured prior at density rho, -1 for the rest (ties: the first tiles in row order)."""
    kept = tile_sums(keep, tile) / tile_sums(torch.ones_like(keep, dtype=torch.float32), tile)
    n_dense = int(round(kept.numel() * (2.0 * density - 1.0)))
    prior = torch.full(kept.shape, -1.0)
    if n_dense > 0:
        order = torch.sort(kept.flatten(), descending=True, stable=True).indices[:n_dense]
        prior.view(-1)[order] = 1.0
    return prior


def exact_dense_tiles(tile_logits: dict, tile_sizes: dict, target: float) -> dict:
    """Tiles dense or 2:4 so that the effective sparsity (half the weights of the 2:4 tiles) is as
    close to `target` as whole tiles allow: the tiles with the lowest logits go 2:4 first, over
    all layers together (ties in layer order, then row order)."""
    names = list(tile_logits)
    flat = torch.cat([tile_logits[n].float().flatten() for n in names])
    sizes = torch.cat([tile_sizes[n].flatten() for n in names])
    wanted = 2.0 * target * float(sizes.sum())  # weights that must sit in 2:4 tiles
    order = torch.sort(flat, stable=True).indices
    cum = torch.cumsum(sizes[order].double(), 0)
    options = torch.cat([torch.zeros(1, dtype=torch.float64), cum])
    k = int(torch.argmin((options - wanted).abs()))  # how many tiles go 2:4
    dense = torch.ones(flat.shape, dtype=torch.bool)
    dense[order[:k]] = False
    out, offset = {}, 0
    for n in names:
        size = tile_logits[n].numel()
        out[n] = dense[offset:offset + size].view(tile_logits[n].shape)
        offset += size
    return out


# ---------------------------------------------------------------------------------------------
# The method

@register
class Patch(LearnedMaskPruner):
    name = "patch"
    display = "PATCH"
    summary = "learned dense-or-2:4 tiles with MaskLLM-style 2:4 inside, one global budget (PATCH 2025)"
    capabilities = Capabilities(patterns=("hybrid",), needs_calibration=True, needs_gradients=True)
    logged_schedule = ("tile_tau", "tile_kappa", "group_tau", "group_kappa")
    # The fused pass decides the draws; MaskLLM's pattern maths decides the tiles' 2:4 choices.
    engine_modules = ("prunebench.engines.fused_masks", "prunebench.engines.concrete", "prunebench.methods.maskllm")

    @dataclass
    class Config(MaskTrainingConfig):
        PRESETS = PRESETS

        mode: Optional[str] = None  # "joint" (tiles and 2:4 learned) | "tile" (2:4 frozen, tiles learned)
        prior_config: Optional[dict] = None  # config of the prior method
        frozen_method: Optional[str] = None  # tile mode: where the frozen 2:4 masks come from (None: prior_method)
        frozen_config: Optional[dict] = None  # its config (e.g. a MaskLLM preset)
        group_init: Optional[str] = None  # joint mode's 2:4 logits: "replace" (the authors') | "add" (MaskLLM's)
        tile_tau_start: Optional[float] = None  # tile gate temperature, linear (4 -> 0.05)
        tile_tau_end: Optional[float] = None
        tile_kappa_start: Optional[float] = None  # tile logit scale, linear (25 -> 350; tile mode 100 -> 500)
        tile_kappa_end: Optional[float] = None
        group_tau_start: Optional[float] = None  # 2:4 temperature, linear (4 -> 0.05)
        group_tau_end: Optional[float] = None
        group_kappa_start: Optional[float] = None  # 2:4 logit scale, linear (100 -> 500)
        group_kappa_end: Optional[float] = None
        lambda_density: Optional[float] = None  # |density - rho| weight before the 1/ga (7; tile mode 3)
        lambda_weight: Optional[float] = None  # kept-norm weight before the 1/ga, fading (10; tile mode 0.1)
        final_mask: Optional[str] = None  # "sign" (dense iff P_t > 0, the authors') | "topk" (exact tile count)

        def validate(self):
            if self.mode not in MODES:
                raise UserError(f"unknown PATCH mode {self.mode!r}", hint=f"use one of {', '.join(MODES)}")
            if self.final_mask not in FINAL_MASK_RULES:
                raise UserError(f"unknown final_mask {self.final_mask!r}", hint=f"use one of {', '.join(FINAL_MASK_RULES)}")
            if min(self.tile_tau_start, self.tile_tau_end, self.group_tau_start, self.group_tau_end) <= 0:
                raise UserError("temperatures must stay positive", hint="e.g. tile_tau_start=4 tile_tau_end=0.05")
            if self.group_init not in GROUP_INITS:
                raise UserError(f"unknown group_init {self.group_init!r}", hint=f"use one of {', '.join(GROUP_INITS)}")
            if self.mode == "joint" and self.frozen_method is not None:
                raise UserError("frozen_method applies to PATCH's tile mode only", hint="set mode=tile, or drop it")

    def check_spec(self, spec: SparsitySpec) -> None:
        if spec.pattern != "hybrid":
            raise UserError(f"PATCH learns dense-or-2:4 tiles, not {spec.pattern_name}",
                            hint="write the effective sparsity as hybrid:0.35 (tile 128) or hybrid:0.35/64")

    def frozen_keys(self) -> tuple:
        return ("S",) if self.config.mode == "tile" else ()

    def uses_methods(self) -> tuple:
        c = self.config
        return tuple(dict.fromkeys(m for m in (c.prior_method, c.frozen_method) if m))

    def schedule(self, step: int) -> dict:
        c, T = self.config, self.config.steps
        return {"tile_tau": linear_schedule(c.tile_tau_start, c.tile_tau_end, step, T),
                "tile_kappa": linear_schedule(c.tile_kappa_start, c.tile_kappa_end, step, T),
                "group_tau": linear_schedule(c.group_tau_start, c.group_tau_end, step, T),
                "group_kappa": linear_schedule(c.group_kappa_start, c.group_kappa_end, step, T),
                "lambda_weight": fading(c.lambda_weight, step, T),
                "lr": c.lr * lr_factor(step, T, c.warmup_steps, c.lr_schedule, c.lr_final_ratio)}

    def init_logits(self, model, modules, ctx, report) -> dict:
        c, spec = self.config, ctx.sparsity
        check_widths(modules, spec.m, self.display)
        nm = SparsitySpec.parse(f"{spec.n}:{spec.m}")
        unstructured = self.one_shot_masks(model, modules, ctx, c.prior_method, SparsitySpec(spec.target),
                                           c.prior_config)
        patterns = nm_patterns(spec.n, spec.m)
        gen = torch.Generator().manual_seed(ctx.seed)
        tiles = {}
        for name in modules:
            prior = tile_prior(unstructured[name], spec.tile, 1.0 - spec.target)
            p = torch.randn(prior.shape, generator=gen) * c.init_std
            shift = p.std().item() if p.numel() > 1 else c.init_std
            tiles[name] = p + prior * (shift * c.prior_strength)
        del unstructured
        if c.mode == "joint":
            keep = self.one_shot_masks(model, modules, ctx, c.prior_method, nm, c.prior_config)
            return {name: {"T": tiles[name], "G": group_prior_logits(keep[name], patterns, c.init_std, c.prior_strength,
                                                                     c.group_init, gen)}
                    for name in modules}
        source = c.frozen_method or c.prior_method
        keep = self.one_shot_masks(model, modules, ctx, source, nm, c.frozen_config if c.frozen_method else c.prior_config)
        report.stats["frozen_2of4_from"] = source
        return {name: {"T": tiles[name], "S": keep[name].float()} for name in modules}

    def begin(self, modules, spec) -> None:
        weights = {name: weight_matrix(m) for name, m in modules.items()}
        self._shapes = {name: tuple(w.shape) for name, w in weights.items()}
        self._patterns = nm_patterns(spec.n, spec.m).to(next(iter(weights.values())).device)
        self._tile = spec.tile
        self._n_masked = sum(w.numel() for w in weights.values())
        self._target_density = 1.0 - spec.target
        self._dense_norm_total = sum(float(torch.linalg.vector_norm(w.detach().float())) for w in weights.values())

    def tile_gates(self, tile_logits: torch.Tensor, seed: int, sched: dict) -> torch.Tensor:
        """T = sigmoid((kappa_t P_t + L) / tau_t) per tile, L the counter logistic noise of the tiles'
        own stream (few: plain torch ops, differentiable)."""
        noise = counter_logistic(tile_logits.shape, tile_noise_seed(seed), tile_logits.device)
        return torch.sigmoid((sched["tile_kappa"] * tile_logits.float() + noise) / sched["tile_tau"])

    def soft_mask(self, logits: dict, weight: torch.Tensor, seed: int, sched: dict) -> torch.Tensor:
        """M = T + (1 - T) * S for one forward, [out, in], as plain torch ops (the reference the
        fused pass of masked_weight is tested against; tile mode's frozen S)."""
        gate = self.tile_gates(logits["T"], seed, sched)
        if "G" in logits:
            return pattern_mask_torch(logits["G"], self._patterns, weight.shape, seed, sched["group_kappa"],
                                      sched["group_tau"], gate, self._tile)
        return combine(logits["S"].float(), expand_tiles(gate, self._tile, weight.shape))

    def masked_weight(self, layer, index, logits, weight, seed, sched):
        if "G" in logits:  # joint mode: the 2:4 sample, the tiles and M * W in one fused pass
            gate = self.tile_gates(logits["T"], seed, sched)
            masked, mask_sum, masked_sq = pattern_masked_weight(logits["G"], weight, self._patterns, seed,
                                                                sched["group_kappa"], sched["group_tau"], gate,
                                                                self._tile)
            # ||M * W||_F from its square; the floor keeps sqrt's gradient finite for an all-zero product
            return masked, {"mask_sum": mask_sum, "masked_norm": masked_sq.clamp_min(1e-30).sqrt()}
        mask = self.soft_mask(logits, weight, seed, sched)
        masked = mask.to(weight.dtype) * weight
        return masked, {"mask_sum": mask.sum(), "masked_norm": torch.linalg.vector_norm(masked, dtype=torch.float32)}

    def regularisers(self, stats, sched):
        ga = self.config.grad_accum
        mask_sum = torch.stack([s["mask_sum"] for s in stats.values()]).sum()
        density = mask_sum / self._n_masked
        kept = torch.stack([s["masked_norm"] for s in stats.values()]).sum() / self._dense_norm_total
        terms = [(self.config.lambda_density / ga) * (density - self._target_density).abs(),
                 -((sched["lambda_weight"] / ga) * kept)]
        return terms, {"density": density.item()}

    def dense_tiles(self, logits: dict, spec: SparsitySpec) -> dict:
        if self.config.final_mask == "sign":
            return {name: ps["T"] > 0 for name, ps in logits.items()}
        sizes = {name: tile_sums(torch.ones(self._shapes[name]), self._tile) for name in logits}
        return exact_dense_tiles({name: ps["T"].cpu() for name, ps in logits.items()}, sizes, spec.target)

    def logits_per_weight(self, spec) -> float:
        """MaskLLM's six 2:4 pattern logits per group of four (joint mode only) plus one per tile."""
        tile = spec.tile or 128
        return (0.0 if self.config.mode == "tile" else math.comb(4, 2) / 4) + 1 / tile ** 2

    def hard_masks(self, logits, spec) -> dict:
        dense = self.dense_tiles(logits, spec)
        out = {}
        for name, ps in logits.items():
            shape = self._shapes[name]
            two_four = argmax_pattern_mask(ps["G"], self._patterns.to(ps["G"].device), shape) if "G" in ps \
                else ps["S"] > 0.5
            out[name] = two_four | expand_tiles(dense[name].to(two_four.device), self._tile, shape)
        return out

    def finish(self, logits, masks, spec, report) -> None:
        # Read the dense tiles off the final masks (a 2:4 tile keeps exactly half, never all).
        sizes = {name: tile_sums(torch.ones(self._shapes[name]), self._tile) for name in masks}
        dense = {name: tile_sums(m.cpu(), self._tile) == sizes[name] for name, m in masks.items()}
        n_tiles = sum(d.numel() for d in dense.values())
        n_dense = sum(int(d.sum()) for d in dense.values())
        report.stats.update(final_mask=self.config.final_mask, mode=self.config.mode, tile=self._tile,
                            tiles=n_tiles, dense_tiles=n_dense,
                            sign_rule_dense_tiles=sum(int((ps["T"] > 0).sum()) for ps in logits.values()))
        achieved = 1.0 - sum(int(m.sum()) for m in masks.values()) / self._n_masked
        if abs(achieved - spec.target) > SPARSITY_WARN_POINTS:
            report.warnings.append(f"PATCH {self.config.final_mask} rule: effective sparsity {achieved:.4f} is "
                                   f"{100 * abs(achieved - spec.target):.2f} points off the target {spec.target:g} "
                                   f"(final_mask='topk' meets it to a tile)")
