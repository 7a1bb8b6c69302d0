"""AlphaPruning (Lu et al. 2024, "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for
Improved Layer-wise Pruning of Large Language Models", NeurIPS 2024; reference code
github.com/haiquanlu/AlphaPruning).

A per-block allocation from the weights alone (no calibration): for every linear, the
eigenvalues of W^T W (squared singular values) have a heavy-tailed spectrum whose power-law
exponent alpha is estimated with the Hill estimator; a block's alpha is the mean over its
linears.  A smaller alpha is a heavier tail, a better-trained layer, so it is pruned less:

    r_l = (alpha_l - min) / (max - min) * 2 eps + 1 - eps
    sparsity_l = S * r_l * sum(n) / sum(n * r)        (n: parameters per block)

which keeps the parameter-weighted mean at S.  Defaults: eps 0.3 (the paper's; the authors'
Wanda and SparseGPT scripts use 0.2 for LLaMA-7B), the "alpha_peak" estimate.

alpha_peak, as in the reference: the tail start x_min is searched near the peak of the
log-spectrum's histogram (100 bins), and of the candidates the one whose power-law fit has the
smallest Kolmogorov-Smirnov distance wins; alpha = 1 + n / sum(log(lambda_i / x_min)) over the
n eigenvalues >= x_min.  The reference's window is meant to be [0.95, 1.5] x the peak value,
but it compares each eigenvalue with log10(0.95 x peak), so in effect every eigenvalue below
1.5 x peak is a candidate; we use the intended window [0.95 peak, 1.5 peak] (and fall back on
the whole spectrum below 1.5 peak if that window is empty).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunebench.engines.allocation import Allocation, clip_targets, register_allocation
from prunebench.errors import UserError
from prunebench.contract import STATS_NONE

HIST_BINS = 100  # reference: bins of the log10 spectrum histogram
PEAK_WINDOW = (0.95, 1.5)  # reference: x_min candidates around the histogram peak


def spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of W^T W, ascending (float64 from the float32 singular values)."""
    return torch.linalg.svdvals(weight.float()).double().pow(2).sort().values


def hill_alpha(eigs: torch.Tensor, start: int) -> float:
    tail = eigs[start:]
    n = tail.numel()
    denom = float(torch.log(tail).sum() - n * math.log(float(eigs[start])))
    return 1.0 + n / denom if denom > 0 else float("inf")


def _ks_distance(eigs: torch.Tensor, start: int, alpha: float) -> float:
    tail = eigs[start:]
    n = tail.numel()
    model_cdf = 1.0 - (tail / eigs[start]).pow(1.0 - alpha)
    empirical = torch.arange(n, dtype=torch.float64) / n
    return float((model_cdf - empirical).abs().max())


def alpha_peak(eigs: torch.Tensor) -> float:
    """Hill estimate with x_min chosen by KS distance near the spectrum's histogram peak."""
    eigs = eigs[eigs > 0]
    if eigs.numel() < 3:
        raise UserError("alphapruning: a weight matrix has fewer than 3 non-zero singular values")
    logs = torch.log10(eigs)
    lo, hi = float(logs.min()), float(logs.max())
    counts = torch.histc(logs.float(), HIST_BINS, min=lo, max=hi)
    edges = torch.linspace(lo, hi, HIST_BINS + 1, dtype=torch.float64)
    peak = 10 ** float(edges[int(torch.argmax(counts))])
    candidates = [i for i in range(eigs.numel() - 1) if PEAK_WINDOW[0] * peak <= float(eigs[i]) <= PEAK_WINDOW[1] * peak]
    if not candidates:
        candidates = [i for i in range(eigs.numel() - 1) if float(eigs[i]) <= PEAK_WINDOW[1] * peak] or [0]
    best = None
    for i in candidates:
        a = hill_alpha(eigs, i)
        if not (a > 1 and math.isfinite(a)):
            continue
        d = _ks_distance(eigs, i, a)
        if best is None or d < best[0]:
            best = (d, a)
    if best is None:
        raise UserError("alphapruning: no power-law fit of a layer's spectrum has alpha > 1")
    return best[1]


def alpha_sparsities(alphas, sizes, target: float, eps: float) -> list:
    """S * r_l * sum(n) / sum(n r), r the alphas min-max mapped onto [1 - eps, 1 + eps]."""
    a = torch.tensor([float(x) for x in alphas], dtype=torch.float64)
    n = torch.tensor([float(x) for x in sizes], dtype=torch.float64)
    span = float(a.max() - a.min())
    r = torch.ones_like(a) if span == 0 else (a - a.min()) / span * (2 * eps) + (1 - eps)
    s = target * r * n.sum() / (n * r).sum()
    return clip_targets(s.tolist())


@register_allocation
class AlphaPruning(Allocation):
    name = "alphapruning"
    aliases = ("alpha",)
    display_name = "AlphaPruning"
    summary = "per-block sparsity from the heavy-tailed weight spectra (Hill alpha; Lu et al. 2024)"
    statistics = STATS_NONE

    @dataclass
    class Config:
        epsilon: float = 0.3  # paper: sparsities within S x [1 - 0.3, 1 + 0.3] before rescaling

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        if not 0 <= self.config.epsilon < 1:
            raise UserError(f"alphapruning: epsilon must be in [0, 1), got {self.config.epsilon}")

    def block_score(self, linears, spec):
        return sum(alpha_peak(spectrum(w)) for w, _ in linears.values()) / len(linears)

    def block_specs(self, scores, sizes, spec):
        return [spec.with_target(t) for t in alpha_sparsities(scores, sizes, spec.target, self.config.epsilon)]
