"""Sparsity specs and masks: the pure tensor side of pruning.

A mask is a bool tensor shaped like the weight, True where the weight is kept.  What a spec's
pattern means (its text, label, checks, storage) is its Pattern class: one file per pattern
beside this one (prunebench.sparsity.pattern_registry lists them).  The N:M and tile mask
arithmetic lives in those files and is importable from here too, where methods and plugins
(prunebench.PUBLIC) import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunebench.errors import UserError
from prunebench.sparsity.hybrid import (  # noqa: F401  (where methods and the engine import them)
    HYBRID_DENSE_MAX_ZEROS, expand_tiles, hybrid_tiles, tile_grid, tile_sums,
)
from prunebench.sparsity.n_of_m import N_OF_M, nm_mask
from prunebench.sparsity.pattern_registry import known_patterns, pattern_of, spec_syntax
from prunebench.sparsity.unstructured import UNSTRUCTURED

SCOPES = ("row", "layer")  # None on a spec means "the method's own default"


@dataclass(frozen=True)
class SparsitySpec:
    """What fraction of each prunable matrix to remove, and in what pattern.

    `pattern` is a registered pattern's kind: "unstructured" (`target` of the weights zeroed,
    chosen per output row, the Wanda protocol, or over the whole layer: `scope`), "nm" (N weights
    kept out of every M consecutive weights along the input dimension, so the target is 1 - N/M)
    or "hybrid" (every `tile` x `tile` block dense or 2:4; `target`, at most 0.5, the effective
    sparsity over all layers together: PATCH).  Each pattern checks and completes the fields.
    """

    target: float
    pattern: str = UNSTRUCTURED
    n: int = 0
    m: int = 0
    scope: str | None = None
    tile: int = 0

    def __post_init__(self):
        pattern = pattern_of(self.pattern)
        if self.scope is not None and self.scope not in SCOPES:
            raise UserError(f"unknown sparsity scope {self.scope!r}", hint=f"use one of {', '.join(SCOPES)}")
        for name, value in pattern.settle(self).items():
            object.__setattr__(self, name, value)

    def with_target(self, target: float) -> "SparsitySpec":
        """The same pattern and scope at another unstructured target (per-block allocation)."""
        return SparsitySpec(float(target), self.pattern, self.n, self.m, self.scope, self.tile)

    def with_nm(self, n: int, m: int) -> "SparsitySpec":
        """An N:M spec with another N (OWL's per-block N of N:8)."""
        return SparsitySpec(1.0 - n / m, N_OF_M, int(n), int(m), self.scope)

    @property
    def density(self) -> float:
        return 1.0 - self.target

    @property
    def label(self) -> str:
        """Short, stable text form: '0.5', '0.5@layer', '2:4', 'hybrid:0.35/64'."""
        return pattern_of(self.pattern).label(self)

    def to_dict(self) -> dict:
        pattern = pattern_of(self.pattern)
        return {"target": self.target, "pattern": self.pattern_name, "n": self.n, "m": self.m, "scope": self.scope,
                **pattern.record_fields(self)}

    def resolved(self, default_scope: str) -> "SparsitySpec":
        """This spec with the method's default scope filled in where the user gave none."""
        if self.scope is not None or not pattern_of(self.pattern).scoped:
            return self
        return SparsitySpec(self.target, self.pattern, self.n, self.m, default_scope)

    @property
    def pattern_name(self) -> str:
        """What records store as the pattern: 'unstructured', '2:4', 'dense|2:4 tiles'."""
        return pattern_of(self.pattern).record_name(self)

    @classmethod
    def parse(cls, text) -> "SparsitySpec":
        """'0.5' -> 50% per row, '0.5@layer' -> 50% per layer, '2:4' -> N:M, '50%' also accepted;
        'hybrid:0.35/64' -> 64 x 64 tiles each dense or 2:4, 35% effective sparsity: each
        registered pattern reads its own syntax."""
        if isinstance(text, SparsitySpec):
            return text
        if isinstance(text, (int, float)):
            return cls(target=float(text))
        s = str(text).strip()
        for pattern in known_patterns():
            fields = pattern.parse(s)
            if fields is not None:
                return cls(**fields)
        raise UserError(f"cannot read sparsity {text!r}", hint=f"write {spec_syntax()}")


def n_to_prune(count: int, fraction: float) -> int:
    """How many of `count` weights a target `fraction` prunes: the one counting convention of
    every method in prunebench.

    The reference implementations (locuslab/wanda's Wanda and magnitude, SparseGPT's per-block
    selection, fmfi-compbio's ADMM, the OWL and AlphaPruning scripts) all count
    `int(count * fraction)`: the float product truncated, so 60% of a 576-wide row prunes 345
    weights, not 346.  Published numbers come from that convention, so it is the default here.
    (The references' magnitude and SparseGPT thresholds `score <= sorted[int(n * s)]` prune one
    weight more, and every tie at the threshold; we count exactly int(n * s) and break ties by
    position, which is the stated intent.)  The achieved sparsity is always measured from the
    weights and recorded, whatever the convention.
    """
    return int(count * fraction)


def mask_from_scores(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep the highest-scoring weights of a [out, in] score matrix according to `spec`.

    Ties are broken by position, as a stable sort would, so equal inputs always give equal masks.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    s = scores.float().contiguous()
    if spec.pattern == N_OF_M:
        return nm_mask(s, spec.n, spec.m)
    if spec.target == 0:
        return torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if spec.scope in ("row", None):
        return _keep_all_but_lowest(s, n_to_prune(cols, spec.target))
    return _keep_all_but_lowest(s.reshape(1, -1), n_to_prune(rows * cols, spec.target)).view(rows, cols)


def _keep_all_but_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, drop the k lowest scores; ties at the threshold go in column order.

    The same result as a stable ascending sort, in O(n): a selection (kthvalue) instead of a full
    sort, which matters for methods that re-select masks many times (ADMM: 15 per layer).
    """
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if k >= scores.shape[1]:
        return ~keep
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    at_or_below = scores <= threshold
    if bool((at_or_below.sum(dim=1) == k).all()):  # no tie straddles the threshold (float scores:
        return ~at_or_below                         # nearly always): the k lowest, no ordering needed
    below = scores < threshold
    at = scores == threshold
    still_needed = k - below.sum(dim=1, keepdim=True)
    return ~(below | (at & (at.cumsum(dim=1) <= still_needed)))


def is_valid_mask(mask: torch.Tensor, spec: SparsitySpec, tol: float = 0.0) -> bool:
    """Does `mask` satisfy `spec`'s pattern? For N:M, every full group keeps at most N; for a
    hybrid spec every tile is dense or 2:4 (the amount is checked over all layers, elsewhere);
    unstructured, the amount per row or layer within `tol`."""
    return pattern_of(spec.pattern).is_valid_mask(mask, spec, tol)


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum().item()) / weight.numel()


def measure_sparsity(named_weights) -> dict:
    """Achieved sparsity measured from the weights themselves (exact zeros).

    Returns {"overall": float, "per_layer": {name: float}, "n_weights": int, "n_zero": int}.
    """
    per_layer = {}
    total = zeros = 0
    for name, w in named_weights:
        z = int((w == 0).sum().item())
        per_layer[name] = z / w.numel()
        total += w.numel()
        zeros += z
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer, "n_weights": total, "n_zero": zeros}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask into uint8 (8 weights per byte, little bit order)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8) << torch.arange(8, dtype=torch.uint8)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    numel = math.prod(shape)
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[:numel].view(*shape).bool()
