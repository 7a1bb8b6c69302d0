"""Sparsity specs and masks: the pure tensor side of pruning.

A mask is a bool tensor shaped like the weight, True where the weight is kept.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from prunebench.errors import UserError

PATTERNS = ("unstructured", "nm", "hybrid")
# A hybrid spec cuts each matrix into tile x tile blocks, each dense or 2:4 (PATCH); the paper's
# default tile.  The effective sparsity is 0.5 x the fraction of 2:4 tiles, so 0 to 50%.
HYBRID_DEFAULT_TILE = 128
HYBRID_N, HYBRID_M = 2, 4
SCOPES = ("row", "layer")  # None on a spec means "the method's own default"


@dataclass(frozen=True)
class SparsitySpec:
    """What fraction of each prunable matrix to remove, and in what pattern.

    unstructured: `target` of the weights are zeroed, chosen per output row (the Wanda
    protocol) or over the whole layer.  nm: N weights are kept out of every M consecutive
    weights along the input dimension (so the target is 1 - N/M).  hybrid: every `tile` x
    `tile` block is either dense or 2:4, and `target` (at most 0.5) is the effective sparsity
    over all layers together (PATCH).
    """

    target: float
    pattern: str = "unstructured"
    n: int = 0
    m: int = 0
    scope: str | None = None
    tile: int = 0

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise UserError(f"unknown sparsity pattern {self.pattern!r}", hint=f"use one of {', '.join(PATTERNS)}")
        if self.scope is not None and self.scope not in SCOPES:
            raise UserError(f"unknown sparsity scope {self.scope!r}", hint=f"use one of {', '.join(SCOPES)}")
        if self.pattern == "nm":
            if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or self.n < 0:
                raise UserError(f"invalid N:M pattern {self.n}:{self.m}", hint="write it as N:M with 0 <= N < M, e.g. 2:4")
            if self.n >= self.m:
                raise UserError(f"invalid N:M pattern {self.n}:{self.m}: N must be smaller than M", hint="e.g. 2:4 keeps 2 of every 4")
            expected = 1.0 - self.n / self.m
            if abs(self.target - expected) > 1e-9:
                object.__setattr__(self, "target", expected)
        if not (isinstance(self.target, (int, float)) and math.isfinite(self.target) and 0.0 <= self.target < 1.0):
            raise UserError(f"sparsity {self.target!r} is outside [0, 1)", hint="e.g. 0.5 for 50% unstructured, or 2:4")
        if self.pattern == "hybrid":
            if self.target > 1.0 - HYBRID_N / HYBRID_M:
                raise UserError(f"a dense-or-2:4 tile pattern reaches at most 50% sparsity, not {self.target:g}",
                                hint="e.g. hybrid:0.35; for 50% use 2:4")
            if self.scope is not None:
                raise UserError("a hybrid spec has one budget over all layers and takes no scope", hint="write hybrid:0.35")
            object.__setattr__(self, "n", HYBRID_N)
            object.__setattr__(self, "m", HYBRID_M)
            if self.tile == 0:
                object.__setattr__(self, "tile", HYBRID_DEFAULT_TILE)
            if not isinstance(self.tile, int) or self.tile < HYBRID_M or self.tile % HYBRID_M:
                raise UserError(f"tile size {self.tile!r} must be a positive multiple of {HYBRID_M}",
                                hint="e.g. hybrid:0.35/64")
        elif self.tile:
            raise UserError("only a hybrid spec has a tile size", hint="e.g. hybrid:0.35/64")

    def with_target(self, target: float) -> "SparsitySpec":
        """The same pattern and scope at another unstructured target (per-block allocation)."""
        return SparsitySpec(float(target), self.pattern, self.n, self.m, self.scope, self.tile)

    def with_nm(self, n: int, m: int) -> "SparsitySpec":
        """An N:M spec with another N (OWL's per-block N of N:8)."""
        return SparsitySpec(1.0 - n / m, "nm", int(n), int(m), self.scope)

    @property
    def density(self) -> float:
        return 1.0 - self.target

    @property
    def label(self) -> str:
        """Short, stable text form: '0.5', '0.5@layer', '2:4', 'hybrid:0.35/64'."""
        if self.pattern == "hybrid":
            return f"hybrid:{self.target:g}/{self.tile}"
        if self.pattern == "nm":
            return f"{self.n}:{self.m}"
        text = f"{self.target:g}"
        return text if self.scope is None else f"{text}@{self.scope}"

    def to_dict(self) -> dict:
        out = {"target": self.target, "pattern": self.pattern_name, "n": self.n, "m": self.m, "scope": self.scope}
        if self.pattern == "hybrid":
            out["tile"] = self.tile
        return out

    def resolved(self, default_scope: str) -> "SparsitySpec":
        """This spec with the method's default scope filled in where the user gave none."""
        if self.scope is not None or self.pattern != "unstructured":
            return self
        return SparsitySpec(self.target, self.pattern, self.n, self.m, default_scope)

    @property
    def pattern_name(self) -> str:
        if self.pattern == "hybrid":
            return "dense|2:4 tiles"
        return "unstructured" if self.pattern == "unstructured" else f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text) -> "SparsitySpec":
        """'0.5' -> 50% per row, '0.5@layer' -> 50% per layer, '2:4' -> N:M, '50%' also accepted;
        'hybrid:0.35/64' -> 64 x 64 tiles each dense or 2:4, 35% effective sparsity."""
        if isinstance(text, SparsitySpec):
            return text
        if isinstance(text, (int, float)):
            return cls(target=float(text))
        s = str(text).strip()
        hybrid = re.fullmatch(r"hybrid\s*:\s*([0-9.]+)(%?)(?:\s*/\s*(\d+))?", s)
        if hybrid:
            try:
                value = float(hybrid.group(1))
            except ValueError:
                raise UserError(f"cannot read sparsity {text!r}", hint="write hybrid:0.35 or hybrid:0.35/64") from None
            value = value / 100.0 if hybrid.group(2) else value
            return cls(target=value, pattern="hybrid", tile=int(hybrid.group(3) or 0))
        if s.startswith("hybrid"):
            raise UserError(f"cannot read sparsity {text!r}", hint="write hybrid:<effective sparsity>[/<tile>], "
                            "e.g. hybrid:0.35/64")
        nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", s)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if m < 1 or n >= m:
                raise UserError(f"invalid N:M pattern {s!r}: N must be smaller than M", hint="e.g. 2:4 keeps 2 of every 4")
            return cls(target=1.0 - n / m, pattern="nm", n=n, m=m)
        scope = None
        if "@" in s:
            s, scope = s.split("@", 1)
        pct = s.endswith("%")
        try:
            value = float(s[:-1] if pct else s)
        except ValueError:
            raise UserError(f"cannot read sparsity {text!r}", hint="write 0.5, 50%, 0.5@layer or N:M such as 2:4") from None
        return cls(target=value / 100.0 if pct else value, scope=scope)


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
    if spec.pattern == "nm":
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


# Up to this group size an N:M mask ranks each group by pairwise comparison (m^2 cheap
# comparisons per group, no sort): 3-5x faster than a sort along a tiny last dimension, which
# matters for methods that re-select N:M masks many times (ADMM: 15 per layer).
PAIRWISE_RANK_MAX_M = 8


def _descending_rank(groups: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its group (last dim), largest first, ties by position: exactly
    the order of a stable descending sort.  One pass per group position, no [m, m] temporaries."""
    m = groups.shape[-1]
    rank = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
    for j in range(m):
        other = groups[..., j:j + 1]
        ahead = other > groups
        # an equal entry at position j ranks ahead of the entries after it
        ahead[..., j + 1:] |= other == groups[..., j + 1:]
        rank += ahead
    return rank


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive input weights in each row.

    A trailing group shorter than m (input width not divisible by m) keeps
    round(n/m * its length) weights so the overall ratio stays N:M.
    """
    scores = scores.contiguous()
    rows, cols = scores.shape
    full = cols - cols % m
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if full:
        groups = scores[:, :full].reshape(rows, full // m, m)
        if m <= PAIRWISE_RANK_MAX_M:
            mask[:, :full] = (_descending_rank(groups) < n).reshape(rows, full)
        else:
            keep = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
            gmask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
            mask[:, :full] = gmask.reshape(rows, full)
    tail = cols - full
    if tail:
        k = int(round(n / m * tail))
        if k:
            keep = torch.sort(scores[:, full:], dim=1, descending=True, stable=True).indices[:, :k]
            mask[:, full:] = torch.zeros(rows, tail, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
    return mask


def is_valid_mask(mask: torch.Tensor, spec: SparsitySpec, tol: float = 0.0) -> bool:
    """Does `mask` satisfy `spec`'s pattern? For N:M, every full group keeps at most N; for a
    hybrid spec every tile is dense or 2:4 (the amount is checked over all layers, elsewhere)."""
    if spec.pattern == "hybrid":
        return hybrid_tiles(mask, spec.tile, spec.n, spec.m)["counts"]["invalid"] == 0
    if spec.pattern == "nm":
        rows, cols = mask.shape
        full = cols - cols % spec.m
        if full == 0:
            return True
        kept = mask[:, :full].reshape(rows, full // spec.m, spec.m).sum(-1)
        return bool((kept <= spec.n).all())
    sparsity = 1.0 - mask.float().mean().item()
    if spec.scope in ("row", None):
        per_row = 1.0 - mask.float().mean(dim=1)
        step = 1.0 / mask.shape[1]
        return bool(((per_row - spec.target).abs() <= max(tol, step) + 1e-9).all())
    return abs(sparsity - spec.target) <= max(tol, 1.0 / mask.numel()) + 1e-9


# A dense tile may hold the dense model's own exact zeros (a quantised checkpoint has a few), but
# a tile with more zeros than this that is not 2:4 is neither of the hybrid pattern's two kinds.
HYBRID_DENSE_MAX_ZEROS = 0.05


def tile_grid(shape, tile: int) -> tuple:
    """(tile rows, tile columns) of an [out, in] matrix; edge tiles may be smaller."""
    return -(-shape[0] // tile), -(-shape[1] // tile)


def tile_sums(matrix: torch.Tensor, tile: int) -> torch.Tensor:
    """Sum of each tile of an [out, in] matrix (zero-padded at the edges), [tile rows, tile cols]."""
    rows, cols = tile_grid(matrix.shape, tile)
    padded = torch.nn.functional.pad(matrix.float(), (0, cols * tile - matrix.shape[1], 0, rows * tile - matrix.shape[0]))
    return padded.view(rows, tile, cols, tile).sum(dim=(1, 3))


def expand_tiles(per_tile: torch.Tensor, tile: int, shape) -> torch.Tensor:
    """Broadcast a [tile rows, tile cols] tensor over its tiles, cropped to `shape`."""
    return per_tile.repeat_interleave(tile, dim=0)[:shape[0]].repeat_interleave(tile, dim=1)[:, :shape[1]]


def hybrid_tiles(kept: torch.Tensor, tile: int, n: int = 2, m: int = 4) -> dict:
    """Classify the tiles of a keep-mask [out, in]: 'nm' (every group of m inputs keeps at most
    n), 'dense' (not N:M, at most HYBRID_DENSE_MAX_ZEROS of it zero), or 'invalid' (neither).
    Returns bool [tile rows, tile cols] tensors under those keys, and the count of each."""
    rows, cols = kept.shape
    full = cols - cols % m
    over = torch.zeros(rows, cols)
    if full:
        groups_over = kept[:, :full].reshape(rows, full // m, m).sum(-1) > n  # a group keeping too many
        over[:, :full] = groups_over.repeat_interleave(m, dim=1).float()
    bad_groups = tile_sums(over, tile)
    zeros = tile_sums((~kept).float(), tile) / tile_sums(torch.ones(kept.shape), tile)
    nm = bad_groups == 0
    dense = ~nm & (zeros <= HYBRID_DENSE_MAX_ZEROS)
    invalid = ~nm & ~dense
    return {"nm": nm, "dense": dense, "invalid": invalid,
            "counts": {"nm": int(nm.sum()), "dense": int(dense.sum()), "invalid": int(invalid.sum())}}


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
