"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for
Sparse LLMs", arXiv 2310.08915; code github.com/zyxxmu/DSnoT, lib/prune.py, prune_DSnoT).

Starts from another layer-wise method's mask (Wanda by default) and swaps kept and pruned weights
of each output row without changing any weight value, to shrink the row's expected
reconstruction error

    e_i = sum over pruned j of W_ij E[x_j]          (the output the pruned weights took away)

For at most `max_cycle` (50) cycles, while |e_i| > `update_threshold` (0.1):
  * grow the pruned weight that best offsets e_i: the largest W_ij E[x_j] / Var[x_j] when
    e_i > 0, the smallest when e_i < 0 (a weight whose input varies little is a reliable fix);
  * prune a kept weight in Wanda order (|W_ij| ||x_j||, lowest first), sign-aware: one with
    W_ij E[x_j] < 0 when e_i > 0, > 0 when e_i < 0, so the removal pulls e_i towards 0 too;
  * e_i += W_ik E[x_k] - W_ij E[x_j].
For N:M the weight pruned is the Wanda-lowest kept weight of the grown weight's group of M (not
sign-aware, as the authors'), so every group keeps its count.  Every row keeps its number of
kept weights, so the initial method's sparsity (per row, per layer) is kept exactly.

Defaults and where they come from:
  * max_cycle 50, update_threshold 0.1, the growth score's variance to the power 1: main.py's
    `--max_cycle_time`, `--update_threshold`, `--pow_of_var_regrowing`.
  * the error's unit: their E[x_j] is `sum_metric_row`, the sum of x_j over a calibration window
    averaged over windows, i.e. seqlen * E[x_j].  We use the same unit (tokens per calibration
    window times the engine's mean), so update_threshold means what their flag means at the same
    calibration seqlen (0.1 per 2048-token window is 5e-5 per token).
  * initial: wanda (main.py has no default; the paper's headline is Wanda + DSnoT); sparsegpt and
    magnitude as theirs, or any registered layer-wise method whose mask has the asked pattern,
    with its own options in initial_config.  Its mask is taken as it comes (its own scope).
  * skip: "none" (the paper applies DSnoT to every layer).  Their main.py's hidden default
    `--skip_layer mlp` leaves every MLP linear with its initial mask (DSnoT on attention only):
    `skip: mlp` reproduces it (and `skip: attention` their `--skip_layer self_attn`).  A linear is
    attention when its name's first part names attention (self_attn, attn), else MLP: their OPT
    rule, so OPT's fc1 / fc2 count as MLP.
  * sign_stop: their N:M branch also stops a row for good when a swap would flip the sign of its
    error (relative to the initial error); their unstructured branch has that test behind
    `--without_same_sign`, which `type=bool` with default True makes impossible to switch off, so
    it never runs.  "nm" (default) does exactly that; "always" / "never" apply it or not to both.

Weights: DSnoT never changes a weight value (the paper's "no weight update").  Over an initial
method that updates the weights it keeps (SparseGPT), only its mask is used: the kept weights
keep their dense values, and e_i is computed on the dense weights, as the authors do (their
sparsegpt initial only ranks weights by SparseGPT's saliency W^2 / [H^-1]_jj^2 on the dense
weights, with no OBS update).

Where we differ from their code (the mask changes only in the edge cases named):
  * statistics: E[x_j] and Var[x_j] over all calibration tokens (the engine's float32 mean and
    mean square); their Var is the within-window variance pooled over windows (the spread of the
    window means is left out).  Only the growth ranking depends on it.
  * their candidate lists run on when a row runs out of candidates of the needed sign: the
    growth pointer then walks into kept weights (it "grows" a kept weight, prunes another, and the
    row loses a weight) and the pruning pointer into weights of the wrong sign.  We stop such a
    row.  In N:M a group whose initially kept weights have all been swapped out would lose its
    pattern in theirs (a growth with no pruning); we skip that growth candidate.
  * their sparsegpt initial reads a Hessian that their WrappedGPT allocates but never
    accumulates (add_batch does not touch H): every input counts as dead, the score is 0 and the
    unstructured initial mask prunes the first columns of every row.  Ours is SparseGPT's mask.
  * N:M: they prune the grown weight's group by the initial method's score; we use Wanda's for
    every initial method (the same for Wanda, the default).  Their N:M prunes N of M; ours keeps N.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from prunebench.errors import UserError
from prunebench.contract import Capabilities, LinearResult, STATS_INPUT_MOMENTS, STATS_INPUT_NORM, combine_stats
from prunebench.engines.layerwise import LayerwisePruner
from prunebench.registry import register

from .wanda import wanda_scores
from prunebench import registry

SKIPS = ("none", "mlp", "attention")
SIGN_STOPS = ("nm", "always", "never")


def is_attention(name: str) -> bool:
    """Whether a block-relative linear name belongs to attention (self_attn.q_proj, attn.c_attn)."""
    first = name.split(".")[0].lower()
    return "attn" in first or "attention" in first


# ---------------------------------------------------------------------------------------------
# Pure functions (no model, no engine): testable on synthetic tensors.

def _ascending(key: torch.Tensor) -> torch.Tensor:
    return torch.sort(key, dim=1, stable=True).indices


def dsnot_swap(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
               input_norm: torch.Tensor, *, window: float = 1.0, max_cycle: int = 50, threshold: float = 0.1,
               group: int = 0, sign_stop: bool = False):
    """DSnoT's swap loop on every row of `weight` [out, in] at once, from the keep-mask `keep`.

    mean, var, input_norm: [in] E[x_j], Var[x_j] and ||x_j|| (up to a constant, for Wanda's
    order); window: the unit of the error (tokens per calibration window, see the module
    docstring); group: M for N:M (swaps inside a group of M inputs), 0 for unstructured.
    Returns (keep, error, swaps): the new mask, each row's final error e_i and its number of swaps.
    """
    W = weight.detach().float()
    rows, cols = W.shape
    dev = W.device
    keep0 = keep.to(device=dev, dtype=torch.bool)
    keep = keep0.clone()
    metric = W * (mean.to(dev).float() * float(window)).unsqueeze(0)  # W_ij E[x_j], in window units
    pruned = ~keep0
    error = (metric * pruned).sum(dim=1)
    error_sign = torch.sign(error)
    score = metric / var.to(dev).float().unsqueeze(0)  # growth score; Var 0: +-inf, the first to grow
    inf = torch.tensor(float("inf"), device=dev)

    # Growth lists (initially pruned weights, of the sign that offsets e): for e > 0 the largest
    # score first, read from the end of an ascending stable sort as theirs; for e < 0 the smallest.
    grow_up, grow_dn = pruned & (metric > 0), pruned & (metric < 0)
    up_order = _ascending(torch.where(grow_up, score, -inf))
    dn_order = _ascending(torch.where(grow_dn, score, inf))
    counts = [grow_up.sum(1), grow_dn.sum(1)]
    wanda = wanda_scores(W, input_norm.to(dev).float())
    if group:
        prunable = keep0.clone()  # initially kept and not yet pruned by a swap
        offsets = torch.arange(group, device=dev)
    else:
        # Pruning lists (initially kept weights, Wanda-lowest first): W E[x] < 0 for e > 0, > 0 for e < 0.
        cut_neg, cut_pos = keep0 & (metric < 0), keep0 & (metric > 0)
        neg_order = _ascending(torch.where(cut_neg, wanda, inf))
        pos_order = _ascending(torch.where(cut_pos, wanda, inf))
        counts += [cut_neg.sum(1), cut_pos.sum(1)]
    ptr = [torch.zeros(rows, dtype=torch.long, device=dev) for _ in counts]
    r = torch.arange(rows, device=dev)
    swaps = torch.zeros(rows, dtype=torch.long, device=dev)
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    last = cols - 1
    for _ in range(max_cycle):
        active &= error.abs() > threshold
        if not bool(active.any()):
            break
        up = error > 0
        grow = torch.where(up, up_order[r, (last - ptr[0]).clamp(0, last)], dn_order[r, ptr[1].clamp(max=last)])
        has_grow = torch.where(up, ptr[0] < counts[0], ptr[1] < counts[1])
        if group:
            start = grow - grow % group
            idx = start.unsqueeze(1) + offsets
            inside = idx < cols  # a trailing group narrower than M
            idx = idx.clamp(max=last)
            cand = torch.where(prunable.gather(1, idx) & inside, wanda.gather(1, idx), inf)
            low, at = cand.min(dim=1)
            cut, has_cut = idx[r, at], torch.isfinite(low)
            stop = ~has_grow
        else:
            cut = torch.where(up, neg_order[r, ptr[2].clamp(max=last)], pos_order[r, ptr[3].clamp(max=last)])
            has_cut = torch.where(up, ptr[2] < counts[2], ptr[3] < counts[3])
            stop = ~(has_grow & has_cut)
        after = error + metric[r, cut] - metric[r, grow]
        if sign_stop:
            stop |= torch.sign(after) != error_sign
        active &= ~stop  # a row that cannot (or may not) swap stops for good, as in their loop
        go = active & has_cut  # N:M: a group with nothing left to prune skips this growth candidate
        keep[r[go], grow[go]] = True
        keep[r[go], cut[go]] = False
        error = torch.where(go, after, error)
        swaps += go.long()
        ptr[0] += (active & up).long()
        ptr[1] += (active & ~up).long()
        if group:
            prunable[r[go], cut[go]] = False
        else:
            ptr[2] += (go & up).long()
            ptr[3] += (go & ~up).long()
    return keep, error, swaps


# ---------------------------------------------------------------------------------------------

@register
class DSnoT(LayerwisePruner):
    name = "dsnot"
    display = "DSnoT"
    summary = "training-free mask swaps over an initial mask (Wanda) towards zero expected error (Zhang et al. 2024)"
    # The instance's capabilities add the initial method's statistics to the input moments.
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=True,
                                statistics=combine_stats(STATS_INPUT_NORM, STATS_INPUT_MOMENTS))
    default_scope = "row"  # the instance takes its initial method's
    engine_modules = ("prunebench.methods.wanda",)  # Wanda's score orders the weights DSnoT prunes

    @dataclass
    class Config:
        initial: str = "wanda"  # the method whose mask DSnoT starts from (a layer-wise one)
        initial_config: dict = field(default_factory=dict)  # its options
        max_cycle: int = 50  # main.py --max_cycle_time
        update_threshold: float = 0.1  # main.py --update_threshold (per calibration window, as theirs)
        skip: str = "none"  # the paper: every layer; "mlp" = their main.py's --skip_layer mlp default
        sign_stop: str = "nm"  # their code: the sign-flip stop in N:M only (see the module docstring)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)

        cfg = self.config
        if (isinstance(cfg.max_cycle, bool) or cfg.max_cycle < 0 or not math.isfinite(cfg.update_threshold)
                or cfg.update_threshold < 0 or cfg.skip not in SKIPS or cfg.sign_stop not in SIGN_STOPS):
            raise UserError(f"dsnot: need max_cycle >= 0, a finite update_threshold >= 0, skip in {SKIPS} and "
                            f"sign_stop in {SIGN_STOPS}, got {cfg.max_cycle}, {cfg.update_threshold}, {cfg.skip!r}, "
                            f"{cfg.sign_stop!r}")
        try:
            key = registry.resolve(cfg.initial)
        except UserError as exc:
            raise UserError(f"dsnot: initial={cfg.initial!r}: {exc.message}", hint=exc.hint) from None
        if registry.split_name(key)[1] is not None:
            raise UserError(f"dsnot: initial={cfg.initial!r} carries a sparsity allocation, which acts on the block "
                            "loop, not on a mask", hint=f"allocate for DSnoT itself: dsnot+{registry.split_name(key)[1]}")
        if not issubclass(registry.get(key), LayerwisePruner):
            raise UserError(f"dsnot: initial={cfg.initial!r} is not a layer-wise method, so it gives no per-layer mask",
                            hint="use wanda, sparsegpt, magnitude or another layer-wise method")
        try:
            self._initial = registry.create(key, cfg.initial_config)
        except UserError as exc:
            raise UserError(f"dsnot: initial_config for {key!r}: {exc.message}", hint=exc.hint) from None
        caps = self._initial.capabilities
        self.capabilities = dataclasses.replace(
            self.capabilities, statistics=combine_stats(caps.statistics, STATS_INPUT_MOMENTS),
            patterns=tuple(p for p in self.capabilities.patterns if p in caps.patterns))
        # the mask is the initial method's own: a spec without a scope takes its default scope
        self.default_scope = self._initial.default_scope

    def check_spec(self, spec) -> None:
        if spec.pattern in type(self).capabilities.patterns and spec.pattern not in self._initial.capabilities.patterns:
            raise UserError(f"dsnot: initial method {self.config.initial!r} does not support the {spec.pattern_name} "
                            "pattern", hint=f"it supports: {', '.join(self._initial.capabilities.patterns)}")
        super().check_spec(spec)

    def uses_methods(self) -> tuple:
        return (self.config.initial,) + tuple(self._initial.uses_methods())

    def prune_linear(self, weight, stats, spec, ctx):
        return self.prune_group({"weight": weight}, stats, spec, ctx)["weight"]

    def prune_group(self, weights, stats, spec, ctx):
        cfg = self.config
        if stats is None or stats.input_mean is None:
            raise ValueError("dsnot needs the mean and mean square of the layer inputs (statistics='input_moments')")
        # the initial method gets copies (it may update them); its new weights are not used
        results = self._initial.prune_group({n: w.clone() for n, w in weights.items()}, stats, spec, ctx)
        window = ctx.calibration.shape[1] if ctx is not None and ctx.calibration is not None else 1
        sign_stop = cfg.sign_stop == "always" or (cfg.sign_stop == "nm" and spec.pattern == "nm")
        mean, var, norm = stats.input_mean, stats.input_var, stats.input_norm
        out = {}
        for name, w in weights.items():
            mask = results[name].mask
            warnings = [f"dsnot initial={cfg.initial}: {x}" for x in results[name].warnings]
            skipped = (cfg.skip == "mlp" and not is_attention(name)) or (cfg.skip == "attention" and is_attention(name))
            if not skipped and cfg.max_cycle > 0 and bool((~mask).any()):
                mask, _, _ = dsnot_swap(w, mask, mean, var, norm, window=window, max_cycle=cfg.max_cycle,
                                        threshold=cfg.update_threshold, group=spec.m if spec.pattern == "nm" else 0,
                                        sign_stop=sign_stop)
            out[name] = LinearResult(mask=mask, warnings=warnings)
        return out
