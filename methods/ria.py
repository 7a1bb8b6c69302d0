"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play: An
Efficient Post-training Pruning Method for Large Language Models"; authors' code
github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning, lib/prune.py
prune_ria, main.py flags).

Score of weight W_ij ([out, in], input feature j):

    RI_ij  = |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik|     (its column's and its row's share)
    S_ij   = RI_ij * ||X_j||_2 ** a

||X_j||_2 is the L2 norm of input feature j over the calibration tokens (Wanda's statistic).  No
weight update.  Defaults and where they come from:
  * a = 0.5: paper (Sec. 3.2) and main.py `--a` default.
  * unstructured: one threshold over the whole matrix (main.py: `--per_outneuron` off by default),
    so default_scope "layer"; `per_outneuron=True` (or the spec "0.5@row") compares within each
    output row, Wanda's group.
  * N:M: per row, in groups of M consecutive inputs, keep the N largest scores.  (The authors'
    code passes "2:4" as prune_n=2 and prunes prune_n of every M: its N counts pruned weights.
    prunebench's N counts kept ones; the two agree for 2:4 and 4:8.)
  * activation statistic: their layerwrapper accumulates scaler_row = sum_t x_tj^2 / n_sequences
    and uses sqrt(scaler_row) ** a; prunebench's LayerStats.input_norm is sqrt(mean_t x_tj^2).
    Both are ||X_j||_2 times a constant of the layer, so every mask (per row or per layer) is the
    same; not normalised further.
  * calibration (their defaults 128 C4 windows of 2048 tokens) is the cell's calibration spec.

Where this file departs from the authors' code (selection="reference" restores their arithmetic,
for comparisons with published numbers):
  * an all-zero column or row makes their RI 0/0 = NaN; NaN is never below a threshold, so those
    (already zero) weights count as kept and the layer ends up sparser than asked.  Here 0/0 = 0:
    a zero weight scores 0 and is among the first pruned, at no cost.
  * their layer threshold `score <= sorted(score)[int(n * s)]` prunes int(n * s) + 1 weights and
    every tie at the threshold; here exactly int(n * s), ties broken by position (prunebench's one
    counting convention, sparsity.n_to_prune).  Per-row selection (a stable sort, int(in * s) per
    row) is the same in both; N:M ties are broken by position here (their torch.topk: unspecified).

Not wired yet:
  * `--reallocation` / `--lsa` (channel permutation for N:M): the mask is N:M only in a permuted
    column order, which prunebench's patterns cannot express yet.  The permutation search is here
    as pure, tested functions (zigzag_permutation, lsa_refine, channel_permutation,
    permuted_nm_mask); it becomes a method option once a "permuted N:M" pattern exists.  Their
    defaults: `--importance_score sum`, one LSA pass over the M slots, all groups in one
    assignment (`--fast` splits them into 4/8/16 blocks).  Their LSA runs on a hard-coded
    device "cuda:7"; here on the CPU through scipy.optimize.linear_sum_assignment (scipy is
    optional: importing it is deferred to lsa_refine).
  * `--reconstruction` (a SparseGPT weight update on the RIA mask; their code applies it to
    unstructured masks only): to be built as "SparseGPT update on a given mask", not here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunebench.errors import UserError
from prunebench.contract import Capabilities, LinearResult, STATS_INPUT_NORM
from prunebench.engines.layerwise import LayerwisePruner
from prunebench.registry import register
from prunebench.sparsity.patterns import SparsitySpec, mask_from_scores, nm_mask

SELECTIONS = ("exact", "reference")


# ---------------------------------------------------------------------------------------------
# Pure functions (no model, no engine): testable on synthetic tensors.

def _share(part: torch.Tensor, total: torch.Tensor, zero_sum_nan: bool) -> torch.Tensor:
    if zero_sum_nan:
        return part / total  # the authors' arithmetic: 0/0 = NaN
    return torch.where(total > 0, part / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(part))


def relative_importance(weight: torch.Tensor, zero_sum_nan: bool = False) -> torch.Tensor:
    """RI_ij = |W_ij| / (sum over column j of |W|) + |W_ij| / (sum over row i of |W|), float32."""
    w = weight.detach().abs().float()
    return _share(w, w.sum(dim=0, keepdim=True), zero_sum_nan) + _share(w, w.sum(dim=1, keepdim=True), zero_sum_nan)


def ria_scores(weight: torch.Tensor, input_norm: torch.Tensor, a: float = 0.5,
               zero_sum_nan: bool = False) -> torch.Tensor:
    """RI [out, in] times input_norm [in] ** a, column-wise."""
    norm = input_norm.detach().float().clamp_min(0).to(weight.device)
    return relative_importance(weight, zero_sum_nan) * norm.pow(a).unsqueeze(0)


def reference_layer_mask(scores: torch.Tensor, target: float) -> torch.Tensor:
    """The authors' whole-layer selection: prune every score <= sorted(scores)[int(n * target)],
    i.e. int(n * target) + 1 weights plus every tie; NaN scores are never pruned."""
    flat = scores.float().flatten()
    threshold = torch.sort(flat).values[int(flat.numel() * target)]
    return ~(scores.float() <= threshold)


def ria_mask(scores: torch.Tensor, spec: SparsitySpec, reference: bool = False) -> torch.Tensor:
    """Keep-mask from RIA scores for a resolved spec (scope "layer" or "row", or N:M)."""
    if spec.pattern == "unstructured" and spec.target == 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if not reference:
        return mask_from_scores(scores, spec)
    if spec.pattern == "unstructured" and spec.scope == "layer":
        return reference_layer_mask(scores, spec.target)
    # Their stable sort and topk(largest=False) rank NaN above every number: never pruned.
    return mask_from_scores(torch.nan_to_num(scores.float(), nan=math.inf), spec)


# -- Channel permutation for N:M (`--reallocation`, `--lsa`); not wired into the method yet. --
# A permutation `perm` lists, for each position k of the permuted matrix, the original column
# placed there: the permuted scores are scores[:, perm].

def nm_kept_score(scores: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Sum of the scores an N:M mask keeps, in the column order `perm` (None: the original)."""
    s = scores.float() if perm is None else scores.float()[:, perm]
    return float((s * nm_mask(s, n, m)).sum())


def permuted_nm_mask(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask chosen in the column order `perm`, written back in the original order (so
    mask[:, perm] is N:M)."""
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    mask[:, perm] = nm_mask(scores.float()[:, perm].contiguous(), n, m)
    return mask


def zigzag_permutation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The heuristic channel reallocation: sort the columns by their summed score (ascending),
    cut that order into M equal chunks, and give chunk c to slot c of every group of M, in order
    for even c and reversed for odd c, so each group mixes weak and strong columns."""
    cols = scores.shape[1]
    if m < 1 or cols % m:
        raise ValueError(f"the input width {cols} is not a multiple of M={m}")
    order = torch.sort(scores.float().sum(dim=0), stable=True).indices
    chunk = cols // m
    perm = torch.empty(cols, dtype=torch.long, device=scores.device)
    for slot in range(m):
        part = order[slot * chunk:(slot + 1) * chunk]
        perm[slot::m] = part if slot % 2 == 0 else part.flip(0)
    return perm


def lsa_refine(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, rounds: int = 1,
               max_elements: int = 1 << 24) -> torch.Tensor:
    """Refine a permutation slot by slot with a linear sum assignment (the authors' `--lsa`).

    For slot l, value[g, h] is the kept N:M score of group g when its slot-l column is replaced by
    the slot-l column of group h; the assignment that maximises the total moves each slot-l column
    to its best group.  value[g, g] is the current score, so a pass never lowers the total.
    `max_elements` bounds the [rows, groups, groups, M] temporary (in chunks of groups).
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # scipy is not a prunebench dependency
        raise ImportError("lsa_refine needs scipy (scipy.optimize.linear_sum_assignment)") from exc
    s = scores.detach().float().cpu()
    perm = perm.detach().cpu().clone()
    rows, cols = s.shape
    if m < 1 or cols % m:
        raise ValueError(f"the input width {cols} is not a multiple of M={m}")
    groups = cols // m
    step = max(1, max_elements // max(1, rows * groups * m))
    slots = torch.arange(groups) * m
    for _ in range(rounds):
        for slot in range(m):
            grouped = s[:, perm].view(rows, groups, m)
            moving = grouped[:, :, slot]  # [rows, groups]: each group's slot-l column
            staying = torch.cat([grouped[:, :, :slot], grouped[:, :, slot + 1:]], dim=2)  # [rows, groups, m-1]
            value = torch.empty(groups, groups, dtype=torch.float64)
            for g0 in range(0, groups, step):
                g1 = min(groups, g0 + step)
                cand = torch.cat([moving.unsqueeze(1).expand(rows, g1 - g0, groups).unsqueeze(-1),
                                  staying[:, g0:g1].unsqueeze(2).expand(rows, g1 - g0, groups, m - 1)], dim=-1)
                value[g0:g1] = cand.topk(n, dim=-1).values.sum(dim=(0, 3)).double()
            _, source = linear_sum_assignment(value.numpy(), maximize=True)
            new = perm.clone()
            new[slots + slot] = perm[torch.as_tensor(source, dtype=torch.long) * m + slot]
            perm = new
    return perm.to(scores.device)


def channel_permutation(scores: torch.Tensor, n: int, m: int, lsa: bool = True, rounds: int = 1) -> torch.Tensor:
    """Zig-zag reallocation, refined by LSA when `lsa`.  Ours: the identity is returned when the
    search does not raise the kept N:M score (the authors keep the permutation even then)."""
    perm = zigzag_permutation(scores, m)
    if lsa:
        perm = lsa_refine(scores, perm, n, m, rounds)
    if nm_kept_score(scores, n, m, perm) <= nm_kept_score(scores, n, m):
        return torch.arange(scores.shape[1], device=scores.device)
    return perm


# ---------------------------------------------------------------------------------------------

@register
class RIA(LayerwisePruner):
    name = "ria"
    display = "RIA"
    summary = "relative importance x input-norm^a, one threshold per layer (Zhang et al. 2024)"
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=True, statistics=STATS_INPUT_NORM)
    default_scope = "layer"  # main.py: --per_outneuron off, one threshold over the whole matrix

    @dataclass
    class Config:
        a: float = 0.5  # paper and main.py --a: exponent of the input-feature norm
        per_outneuron: bool = False  # main.py --per_outneuron: compare within each output row (Wanda's group)
        # "exact": prunebench's count and 0/0 = 0; "reference": the authors' layer threshold
        # (one weight more, and every tie) and NaN scores for all-zero rows or columns.
        selection: str = "exact"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        if not (math.isfinite(cfg.a) and cfg.a >= 0):
            raise UserError(f"ria: the exponent a must be a finite number >= 0, got {cfg.a!r}")
        if cfg.selection not in SELECTIONS:
            raise UserError(f"ria: unknown selection {cfg.selection!r}", hint=f"use one of {', '.join(SELECTIONS)}")
        if cfg.per_outneuron:
            self.default_scope = "row"

    def check_spec(self, spec: SparsitySpec) -> None:
        super().check_spec(spec)
        if self.config.per_outneuron and spec.pattern == "unstructured" and spec.scope == "layer":
            raise UserError("ria: per_outneuron compares within rows, but the sparsity asks for scope 'layer'",
                            hint="drop @layer or per_outneuron")

    def prune_linear(self, weight, stats, spec, ctx):
        if stats is None or (stats.input_sq_mean is None and stats.hessian is None):
            raise ValueError("ria needs the input norms of the layer (statistics='input_norm')")
        reference = self.config.selection == "reference"
        scores = ria_scores(weight, stats.input_norm, self.config.a, zero_sum_nan=reference)
        return LinearResult(mask=ria_mask(scores, spec, reference=reference))
