"""Unstructured sparsity: any `target` fraction of the weights zeroed, chosen per output row (the
Wanda protocol) or over the whole layer (the spec's scope; a method's default where none is given).

Written '0.5', '50%', '0.5@row' or '0.5@layer'.
"""
from __future__ import annotations

import torch

from prunebench.sparsity.pattern_base import PERCENT, Pattern

UNSTRUCTURED = "unstructured"
# How a scope is written after the target: '0.5@layer'.
SCOPE_SEPARATOR = "@"


class Unstructured(Pattern):
    kind = UNSTRUCTURED
    syntax = "0.5, 50%, 0.5@layer"
    examples = ("0.5", "0.6@layer")
    label_rank = 1
    scoped = True

    def parse(self, text: str) -> dict | None:
        scope = None
        if SCOPE_SEPARATOR in text:
            text, scope = text.split(SCOPE_SEPARATOR, 1)
        pct = text.endswith("%")
        try:
            value = float(text[:-1] if pct else text)
        except ValueError:
            return None
        return {"target": value / 100.0 if pct else value, "pattern": UNSTRUCTURED, "scope": scope}

    def settle(self, spec) -> dict:
        self.check_target(spec.target)
        self.refuse_tile(spec)
        return {}

    def label(self, spec) -> str:
        text = f"{spec.target:g}"
        return text if spec.scope is None else f"{text}{SCOPE_SEPARATOR}{spec.scope}"

    def record_name(self, spec) -> str:
        return UNSTRUCTURED

    def display_label(self, label) -> str | None:
        try:
            return f"{float(label) * PERCENT:g}%"
        except ValueError:
            return None  # a scoped label ('0.5@layer') prints as it is

    def label_sort_key(self, label) -> tuple | None:
        try:
            return (self.label_rank, float(label), label)
        except ValueError:
            return None

    def reads_record_name(self, name: str) -> bool:
        return name == UNSTRUCTURED

    def label_from_record(self, name: str, target) -> str:
        return f"{float(target):g}"

    def check(self, name: str, kept: torch.Tensor, spec) -> str | None:
        return None  # any zero pattern is unstructured; the amount is checked by check_sparsity

    def is_valid_mask(self, mask: torch.Tensor, spec, tol: float = 0.0) -> bool:
        """The amount, per row (scope row or unset) or over the layer, within `tol` or one weight."""
        sparsity = 1.0 - mask.float().mean().item()
        if spec.scope in ("row", None):
            per_row = 1.0 - mask.float().mean(dim=1)
            step = 1.0 / mask.shape[1]
            return bool(((per_row - spec.target).abs() <= max(tol, step) + 1e-9).all())
        return abs(sparsity - spec.target) <= max(tol, 1.0 / mask.numel()) + 1e-9

    def random_mask(self, spec, kept: int, scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows, cols = scores.shape
        n = rows * cols
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:kept]] = True
        return flat.view(rows, cols)
