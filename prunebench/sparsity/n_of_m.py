"""N:M sparsity: N weights kept out of every M consecutive weights along the input dimension of
each row (so the target is 1 - N/M), and the selection of such a mask from scores.

Written '2:4'.  Stored N:M-packed: each kept value with its position inside its group.
"""
from __future__ import annotations

import math
import re

import torch

from prunebench.errors import UserError
from prunebench.sparsity.pattern_base import Pattern

N_OF_M = "nm"
# The label, and the name records store: '2:4'.
LABEL = re.compile(r"(\d+):(\d+)")
# What CLI and grid text may write: spaces around the colon too.
SPEC_TEXT = re.compile(r"(\d+)\s*:\s*(\d+)")
# A target this close to 1 - N/M is the N:M target (a spec may state it as a float).
TARGET_MATCH_TOLERANCE = 1e-9


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


def nm_packed_bytes(nnz: int, m: int, value_bytes: int) -> int:
    """Kept values plus each one's position inside its group of m (ceil(log2 m) bits)."""
    return nnz * value_bytes + math.ceil(nnz * max(1, math.ceil(math.log2(m))) / 8)


class NOfM(Pattern):
    kind = N_OF_M
    syntax = "N:M such as 2:4"
    examples = ("2:4",)
    label_rank = 2
    checked_scope = "layer"  # an N:M mask is exactly 1 - N/M per layer, except in a short trailing group
    fixed_target = True

    def parse(self, text: str) -> dict | None:
        nm = SPEC_TEXT.fullmatch(text)
        if not nm:
            return None
        n, m = int(nm.group(1)), int(nm.group(2))
        if m < 1 or n >= m:
            raise UserError(f"invalid N:M pattern {text!r}: N must be smaller than M", hint="e.g. 2:4 keeps 2 of every 4")
        return {"target": 1.0 - n / m, "pattern": N_OF_M, "n": n, "m": m}

    def settle(self, spec) -> dict:
        if not (isinstance(spec.n, int) and isinstance(spec.m, int)) or spec.m < 1 or spec.n < 0:
            raise UserError(f"invalid N:M pattern {spec.n}:{spec.m}", hint="write it as N:M with 0 <= N < M, e.g. 2:4")
        if spec.n >= spec.m:
            raise UserError(f"invalid N:M pattern {spec.n}:{spec.m}: N must be smaller than M",
                            hint="e.g. 2:4 keeps 2 of every 4")
        fixes = {}
        expected = 1.0 - spec.n / spec.m
        if abs(spec.target - expected) > TARGET_MATCH_TOLERANCE:
            fixes["target"] = expected
        self.check_target(fixes.get("target", spec.target))
        self.refuse_tile(spec)
        return fixes

    def label(self, spec) -> str:
        return f"{spec.n}:{spec.m}"

    def record_name(self, spec) -> str:
        return f"{spec.n}:{spec.m}"

    def display_label(self, label) -> str | None:
        return label if LABEL.fullmatch(str(label)) else None

    def label_sort_key(self, label) -> tuple | None:
        match = LABEL.fullmatch(str(label))
        if not match:
            return None
        kept, group = int(match.group(1)), int(match.group(2))
        return (self.label_rank, 1.0 - kept / group, label)

    def reads_record_name(self, name: str) -> bool:
        return LABEL.fullmatch(name) is not None

    def nominal_sparsity(self, name: str, target) -> float:
        match = LABEL.fullmatch(name)
        return 1.0 - int(match.group(1)) / int(match.group(2))

    def check(self, name: str, kept: torch.Tensor, spec) -> str | None:
        rows, cols = kept.shape
        full = cols - cols % spec.m
        if full == 0:
            return None
        per_group = (kept[:, :full] != 0).reshape(rows, full // spec.m, spec.m).sum(-1)
        bad = int((per_group > spec.n).sum())
        if bad:
            return (f"{name}: {bad} of {per_group.numel()} groups of {spec.m} keep more than {spec.n} "
                    f"(not {spec.pattern_name})")
        return None

    def storage_formats(self, spec, rows: int, cols: int, kept: int, value_bytes: int, *,
                        mask: torch.Tensor | None = None, sparsity: float | None = None) -> dict:
        if kept == rows * cols:
            return {}  # a fully kept linear is no N:M mask
        return {f"{spec.n}:{spec.m} packed": nm_packed_bytes(kept, spec.m, value_bytes)}

    def random_mask(self, spec, kept: int, scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return nm_mask(scores, spec.n, spec.m)  # exactly N of every M: the kept count follows from the shape
