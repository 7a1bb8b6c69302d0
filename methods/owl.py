"""OWL: outlier-weighed layer-wise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", arXiv 2310.05175;
reference code github.com/luuyin/OWL).

A per-block allocation, not a mask rule: it composes with any layer-wise method
("wanda+owl", "sparsegpt+owl", "magnitude+owl").  On the dense model, block by block (the inputs
of block l are the dense outputs of block l-1, one calibration pass):

    A = |W_ij| * ||X_j||_2 over all linears of the block  (the Wanda score)
    D_l = percent of the block's entries of A above M * mean(A)   (its outlier ratio)
    D'_l = (D_l - min D) / (max D - min D) * 2 * lambda
    sparsity_l = S - D'_l + mean(D')

so blocks with more outliers are pruned less, and the mean over blocks stays S (one ratio per
block: the maintainers confirm it in OWL issue 9).  Defaults M = 5, lambda = 0.08 (the paper's
LLaMA settings).

N:M (the reference's structured variant, for N:8): D'' = (D - min) / (max - min) * lambda_nm,
shifted to mean 0 and rounded to whole weights; block l prunes (M - N) - D''_l of every 8, so
4:8 becomes a mix of 3:8, 4:8 and 5:8 blocks.  Defaults M = 6 (outlier threshold), lambda_nm = 2
(the reference's N:M settings).  The reference then turns every +1 into +2, which makes those
blocks 6:8 and the model denser than the N:M it names; we keep the rounded value, so the mean
stays at the requested N (the achieved sparsity is recorded either way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunebench.engines.allocation import Allocation, clip_targets, register_allocation
from prunebench.errors import UserError
from prunebench.contract import STATS_INPUT_NORM

NM_GROUP = 8  # the reference's structured variant is defined for N:8


def outlier_ratio(scores: torch.Tensor, threshold: float) -> float:
    """Percent of entries above `threshold` times their mean (OWL's layer outlier distribution)."""
    flat = scores.flatten().double()
    return float((flat > flat.mean() * threshold).sum()) * 100.0 / max(flat.numel(), 1)


def owl_sparsities(ratios, target: float, lam: float) -> list:
    """Per-block sparsity S - D' + mean(D'), D' the outlier ratios min-max scaled to [0, 2 lambda]."""
    d = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    span = float(d.max() - d.min())
    if span == 0:
        return [float(target)] * len(ratios)  # every block alike: uniform
    scaled = (d - d.min()) / span * (2.0 * lam)
    return clip_targets((target - scaled + scaled.mean()).tolist())


def owl_nm_pruned(ratios, n_pruned: int, lam: float) -> list:
    """Per-block count of pruned weights per group: n_pruned - round(D'' - mean D'')."""
    d = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    span = float(d.max() - d.min())
    if span == 0:
        return [int(n_pruned)] * len(ratios)
    scaled = (d - d.min()) / span * lam
    shift = torch.round(scaled - scaled.mean())
    return [int(n_pruned - s) for s in shift.tolist()]


@register_allocation
class OWL(Allocation):
    name = "owl"
    display_name = "OWL"
    summary = "outlier-weighed per-block sparsity from the dense model's Wanda scores (Yin et al. 2023)"
    statistics = STATS_INPUT_NORM
    patterns = ("unstructured", "nm")

    @dataclass
    class Config:
        threshold_m: float = 5.0  # paper / reference (Hyper_m): an outlier is above 5 x the mean score
        lam: float = 0.08  # paper / reference (Lamda): per-block sparsities within S +- 8 points
        nm_threshold_m: float = 6.0  # reference's N:M setting
        nm_lam: float = 2.0  # reference's N:M setting: at most +-1 weight of 8 per block

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        if c.threshold_m <= 0 or c.nm_threshold_m <= 0 or c.lam < 0 or c.nm_lam < 0:
            raise UserError("owl: need threshold_m > 0, nm_threshold_m > 0, lam >= 0 and nm_lam >= 0")

    def check_spec(self, spec):
        super().check_spec(spec)
        if spec.pattern == "nm" and spec.m != NM_GROUP:
            raise UserError(f"owl: the N:M variant is defined for N:{NM_GROUP} (a per-block N of {NM_GROUP}), not "
                            f"{spec.pattern_name}", hint="use 4:8, or an unstructured target; 2:4 has no per-block variant "
                            "that stays 2:4")

    def block_score(self, linears, spec):
        m = self.config.nm_threshold_m if spec.pattern == "nm" else self.config.threshold_m
        scores = torch.cat([(w.abs() * stats.input_norm.to(w.dtype).unsqueeze(0)).flatten() for w, stats in linears.values()])
        return outlier_ratio(scores, m)

    def block_specs(self, scores, sizes, spec):
        if spec.pattern == "nm":
            pruned = owl_nm_pruned(scores, spec.m - spec.n, self.config.nm_lam)
            return [spec.with_nm(min(max(spec.m - p, 1), spec.m - 1), spec.m) for p in pruned]
        return [spec.with_target(t) for t in owl_sparsities(scores, spec.target, self.config.lam)]
