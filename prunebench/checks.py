"""What the runner verifies in every method's output, built-in or plugin, before a record says ok.

1. Every prunable weight is finite.
2. The zero pattern is the spec's pattern: each pattern has a checker, registered here by name
   (`register_pattern_checker`), so a new pattern (a hybrid dense/2:4 tile layout, say) brings
   its own through the same hook.
3. The achieved sparsity, measured from the weights, is within SPARSITY_TOLERANCE of the target
   at the scope the method reports it used (per row, per layer, or over all layers together).

A failed check raises OutputCheckError with a one-line reason; the runner records the cell as
failed and goes on.
"""
from __future__ import annotations

from typing import Callable

import torch

from .sparsity import SparsitySpec, hybrid_tiles

# Achieved sparsity may differ from the target by this much (a fraction: 0.005 = half a point) at
# the checked scope, plus the rounding of one weight per checked unit (row or layer).  Weights
# that were already zero in the dense model count as pruned, as every score-based method treats
# them, so a dense model with a few exact zeros stays inside it.
SPARSITY_TOLERANCE = 0.005


class OutputCheckError(Exception):
    """A method's output does not satisfy the cell's spec."""


# pattern name -> checker(name, weight [out, in], spec) -> None or a reason string
PatternChecker = Callable[[str, torch.Tensor, SparsitySpec], "str | None"]
_PATTERN_CHECKERS: dict[str, PatternChecker] = {}


def register_pattern_checker(pattern: str, checker: PatternChecker) -> None:
    _PATTERN_CHECKERS[pattern] = checker


def _check_nm(name: str, weight: torch.Tensor, spec: SparsitySpec) -> str | None:
    rows, cols = weight.shape
    full = cols - cols % spec.m
    if full == 0:
        return None
    kept = (weight[:, :full] != 0).reshape(rows, full // spec.m, spec.m).sum(-1)
    bad = int((kept > spec.n).sum())
    if bad:
        return f"{name}: {bad} of {kept.numel()} groups of {spec.m} keep more than {spec.n} (not {spec.pattern_name})"
    return None


def _check_hybrid(name: str, weight: torch.Tensor, spec: SparsitySpec) -> str | None:
    tiles = hybrid_tiles(weight != 0, spec.tile, spec.n, spec.m)
    bad = tiles["counts"]["invalid"]
    if bad:
        r, c = (int(i) for i in tiles["invalid"].nonzero()[0])
        return (f"{name}: {bad} of {tiles['invalid'].numel()} tiles of {spec.tile} x {spec.tile} are neither dense nor "
                f"{spec.n}:{spec.m} (first: tile row {r}, column {c})")
    return None


def _check_unstructured(name: str, weight: torch.Tensor, spec: SparsitySpec) -> str | None:
    return None  # any zero pattern is unstructured; the amount is checked by check_sparsity


register_pattern_checker("nm", _check_nm)
register_pattern_checker("unstructured", _check_unstructured)
register_pattern_checker("hybrid", _check_hybrid)


def check_finite(named_weights) -> None:
    for name, w in named_weights:
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise OutputCheckError(f"{name} has {bad} non-finite weight(s) (NaN or inf) after pruning")


def check_pattern(named_weights, spec: SparsitySpec) -> None:
    checker = _PATTERN_CHECKERS.get(spec.pattern)
    if checker is None:
        raise OutputCheckError(f"no checker is registered for the {spec.pattern_name} pattern")
    for name, w in named_weights:
        reason = checker(name, w, spec)
        if reason:
            raise OutputCheckError(reason)


def check_sparsity(named_weights, spec: SparsitySpec, scope: str | None, tolerance: float = SPARSITY_TOLERANCE) -> None:
    """Achieved sparsity against the target, at `scope` (row | layer | global).

    N:M specs are checked per layer (an N:M mask is exactly 1 - N/M except in a short trailing
    group).
    """
    named = list(named_weights)
    target = spec.target
    scope = "layer" if spec.pattern == "nm" else (scope or "global")
    if scope == "global":
        zeros = sum(int((w == 0).sum()) for _, w in named)
        total = sum(w.numel() for _, w in named)
        achieved = zeros / max(total, 1)
        if abs(achieved - target) > tolerance + 1.0 / max(total, 1):
            raise OutputCheckError(f"achieved sparsity {achieved:.4f} over all layers is more than {tolerance:.3f} "
                                   f"from the target {target:.4f}")
        return
    for name, w in named:
        if scope == "row":
            per_row = (w == 0).float().mean(dim=1)
            off = (per_row - target).abs()
            worst = int(off.argmax())
            if float(off[worst]) > tolerance + 1.0 / w.shape[1]:
                raise OutputCheckError(f"{name}: row {worst} has sparsity {float(per_row[worst]):.4f}, more than "
                                       f"{tolerance:.3f} from the per-row target {target:.4f}")
        elif scope == "layer":
            achieved = float((w == 0).float().mean())
            if abs(achieved - target) > tolerance + 1.0 / w.numel():
                raise OutputCheckError(f"{name}: sparsity {achieved:.4f} is more than {tolerance:.3f} from the "
                                       f"per-layer target {target:.4f}")
        else:
            raise OutputCheckError(f"unknown sparsity scope {scope!r} reported by the method")


def check_output(named_weights, spec: SparsitySpec, scope: str | None, *, dense: bool = False,
                 layer_specs: dict | None = None) -> None:
    """All checks for one cell. `named_weights`: (name, [out, in] weight) pairs.

    layer_specs (name -> spec), from a per-block allocation: every linear is checked against its
    own block's spec (pattern and amount, at the method's scope, "layer" for a global scope),
    and for unstructured targets the whole model against the cell's target as well.
    """
    named = [(n, w.detach()) for n, w in named_weights]
    check_finite(named)
    if dense:
        return
    if layer_specs:
        missing = [n for n, _ in named if n not in layer_specs]
        if missing:
            raise OutputCheckError(f"the allocation gave no target for {missing[0]} ({len(missing)} linears)")
        per_layer_scope = "layer" if scope in (None, "global") else scope
        for name, w in named:
            check_pattern([(name, w)], layer_specs[name])
            check_sparsity([(name, w)], layer_specs[name], per_layer_scope)
        if spec.pattern != "nm":
            # Each block's target is truncated per row (or layer): allow that rounding once more.
            unit = max((1.0 / w.shape[1] if per_layer_scope == "row" else 1.0 / w.numel()) for _, w in named)
            check_sparsity(named, spec, "global", tolerance=SPARSITY_TOLERANCE + unit)
        return
    check_pattern(named, spec)
    check_sparsity(named, spec, scope)


def effective_scope(spec: SparsitySpec, reported: str | None) -> str:
    """The scope to check: the one the method reports using; an explicit scope in the spec must
    be the one used (a method may not quietly widen '0.5@row' to a global budget)."""
    if spec.pattern == "nm":
        return "layer"
    if spec.scope is not None and reported is not None and reported != spec.scope:
        raise OutputCheckError(f"the spec asks for sparsity per {spec.scope}, but the method used scope {reported!r}")
    return reported or spec.scope or "global"
