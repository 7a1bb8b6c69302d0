"""What the runner verifies in every method's output, built-in or plugin, before a record says ok.

1. Every prunable weight is finite.
2. The pruned pattern is the spec's pattern: each pattern's class checks its own (Pattern.check,
   prunebench/sparsity/pattern_registry.py), so a new pattern brings its check in its own file.
3. The achieved sparsity of that pattern is within SPARSITY_TOLERANCE of the target at the scope
   the method reports it used (per row, per layer, or over all layers together), or at the one
   scope the pattern fixes (Pattern.checked_scope: per layer for N:M).
4. Every parameter the method was not asked to change (embeddings, norms, biases, the output
   head: everything but the decoder linears' weights) is the dense model's, bit for bit
   (`check_against_dense`, against a `DenseReference` taken before pruning).
5. The weights the method kept are what it says it did to them: the dense values, bit for bit,
   for a mask-only method; finite and within UPDATE_BOUND of the layer's dense scale for one
   that updates them (Capabilities.updates_weights), whose change is then measured and recorded.

The pruned pattern is the method's own keep-mask where it reports one (PruneReport.masks: both
engines do, and a plugin's `prune` may), so the dense model's exact zeros (4.5% of Gemma-3-270M's
dequantised Q4_K_M linears) count as kept weights where the mask keeps them; every weight the mask
prunes must be zero, and a weight the mask keeps may be zero only where the dense one was (or, for
a method that updates weights, where it then counts as pruned).  Without masks the pattern is read
from the weights' zeros, the dense model's own included (`kept_masks`).

A failed check raises OutputCheckError with a one-line reason; the runner records the cell as
failed and goes on.
"""
from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass

import torch

from prunebench.modeling.models import all_prunable, is_conv1d, snapshot_prunable
from prunebench.sparsity.pattern_registry import pattern_of
from prunebench.sparsity.patterns import SparsitySpec

# Achieved sparsity may differ from the target by this much (a fraction: 0.005 = half a point) at
# the checked scope, plus the rounding of one weight per checked unit (row or layer).
SPARSITY_TOLERANCE = 0.005

# A method that updates the weights it keeps (a reconstruction) may move them, but no kept weight
# may grow past this multiple of the largest dense weight of its layer: a blow-up, not a repair.
# Measured: SparseGPT on the embedded model peaks at 6.4 times it (2:4; 1.1 at 50%, 1.4 at 80%),
# SparseGPT and ADMM on the tiny models at 3.2 (80%).
UPDATE_BOUND = 100.0


class OutputCheckError(Exception):
    """A method's output does not satisfy the cell's spec."""


def check_finite(named_weights) -> None:
    for name, w in named_weights:
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise OutputCheckError(f"{name} has {bad} non-finite weight(s) (NaN or inf) after pruning")


def check_pattern(named_weights, spec: SparsitySpec) -> None:
    """named_weights: (name, [out, in] tensor) pairs whose zeros (False) are the pruned weights:
    weights, or keep-masks (kept_masks)."""
    pattern = pattern_of(spec.pattern)
    for name, w in named_weights:
        reason = pattern.check(name, w, spec)
        if reason:
            raise OutputCheckError(reason)


def check_sparsity(named_weights, spec: SparsitySpec, scope: str | None, tolerance: float = SPARSITY_TOLERANCE) -> None:
    """Achieved sparsity against the target, at `scope` (row | layer | global), counting the
    zeros (False) of weights or keep-masks (kept_masks).

    A pattern that fixes its scope is checked at it (N:M per layer: an N:M mask is exactly 1 - N/M
    except in a short trailing group).
    """
    named = list(named_weights)
    target = spec.target
    scope = pattern_of(spec.pattern).checked_scope or scope or "global"
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
                 layer_specs: dict | None = None, model=None, reference: "DenseReference | None" = None,
                 updates_weights: bool = False, masks: dict | None = None) -> dict | None:
    """All checks for one cell. `named_weights`: (name, [out, in] weight) pairs.

    masks (name -> bool keep-mask [out, in]): what the method pruned (PruneReport.masks); the
    pattern and amount are checked on them (see kept_masks).  None: on the weights' zeros.

    layer_specs (name -> spec), from a per-block allocation: every linear is checked against its
    own block's spec (pattern and amount, at the method's scope, "layer" for a global scope),
    and for unstructured targets the whole model against the cell's target as well.

    With `model` and the `reference` taken before pruning, the pruned model is compared with the
    dense one too (check_against_dense; `updates_weights`: what the method declares, see
    prunebench.contract.declares_weight_updates), and what that found is returned, with "mask":
    "reported" or "zeros" (where the checked pattern came from; None for a dense cell).
    """
    named = [(n, w.detach()) for n, w in named_weights]
    check_finite(named)
    found = None
    if dense:
        if reference is not None:
            found = {**check_against_dense(model, reference, updates_weights=updates_weights, dense=True), "mask": None}
        return found
    dense_weights = dense_matrices(model, reference) if reference is not None else None
    kept = kept_masks(named, masks, dense_weights, updates_weights=updates_weights)
    if reference is not None:
        found = check_against_dense(model, reference, updates_weights=updates_weights,
                                    masks=dict(kept) if masks is not None else None)
        found["mask"] = "reported" if masks is not None else "zeros"
    if layer_specs:
        missing = [n for n, _ in kept if n not in layer_specs]
        if missing:
            raise OutputCheckError(f"the allocation gave no target for {missing[0]} ({len(missing)} linears)")
        per_layer_scope = "layer" if scope in (None, "global") else scope
        for name, k in kept:
            check_pattern([(name, k)], layer_specs[name])
            check_sparsity([(name, k)], layer_specs[name], per_layer_scope)
        if pattern_of(spec.pattern).checked_scope is None:
            # Each block's target is truncated per row (or layer): allow that rounding once more.
            unit = max((1.0 / k.shape[1] if per_layer_scope == "row" else 1.0 / k.numel()) for _, k in kept)
            check_sparsity(kept, spec, "global", tolerance=SPARSITY_TOLERANCE + unit)
        return found
    check_pattern(kept, spec)
    check_sparsity(kept, spec, scope)
    return found


def dense_matrices(model, reference: "DenseReference") -> dict:
    """name -> the dense [out, in] weight of each pruned linear (views of the reference's copies)."""
    modules = all_prunable(model)
    return {name: (d.t() if name in modules and is_conv1d(modules[name]) else d)
            for name, d in reference.prunable.items()}


def kept_masks(named, masks: dict | None, dense_weights: dict | None = None, *, updates_weights: bool = False) -> list:
    """The keep-mask each check counts, as (name, bool [out, in]) pairs in `named`'s order.

    Without masks: the weights' non-zeros (the dense model's zeros then count as pruned).  With
    the method's masks: every weight a mask prunes must be zero; a weight it keeps may be zero
    where the dense one was (the dense model's own zero, kept).  A kept weight zeroed whose dense
    one was not: refused for a mask-only method (it zeroed more than its mask says); a method that
    updates weights may land a kept weight on exactly zero, which then counts as pruned, so many
    of them still fail the amount or pattern.  Without the dense weights a kept zero counts as
    pruned too (no way to tell whose it is)."""
    if masks is None:
        return [(name, w != 0) for name, w in named]
    missing = [name for name, _ in named if name not in masks]
    if missing:
        raise OutputCheckError(f"the method's masks have none for {missing[0]} ({len(missing)} of {len(named)} linears)")
    out = []
    for name, w in named:
        mask = masks[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(w.shape):
            what = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise OutputCheckError(f"{name}: the method's mask must be a bool tensor of the weight's shape "
                                   f"{tuple(w.shape)}, got {what}")
        mask = mask.to(w.device)
        nonzero = w != 0
        leaked = ~mask & nonzero
        if bool(leaked.any()):
            raise OutputCheckError(f"{name}: {int(leaked.sum())} weight(s) its mask prunes are not zero")
        zeroed = mask & ~nonzero
        if dense_weights is not None and name in dense_weights:
            zeroed &= dense_weights[name].to(w.device) != 0
        if not updates_weights and dense_weights is not None and bool(zeroed.any()):
            raise OutputCheckError(f"{name}: {int(zeroed.sum())} weight(s) its mask keeps are zero but were not in "
                                   f"the dense model: the method zeroed more than its mask says")
        out.append((name, mask & ~zeroed))
    return out


def effective_scope(spec: SparsitySpec, reported: str | None) -> str:
    """The scope to check: the one the method reports using; an explicit scope in the spec must
    be the one used (a method may not quietly widen '0.5@row' to a global budget)."""
    fixed = pattern_of(spec.pattern).checked_scope
    if fixed:
        return fixed
    if spec.scope is not None and reported is not None and reported != spec.scope:
        raise OutputCheckError(f"the spec asks for sparsity per {spec.scope}, but the method used scope {reported!r}")
    return reported or spec.scope or "global"


# ---------------------------------------------------------------------------------------------
# Everything else is the dense model's (4 and 5 of the module docstring)

def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (copied to the CPU one tensor at a time)."""
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fixed_parameters(model) -> dict:
    """Every parameter a pruning method was not asked to change: all but the decoder linears'
    weights (a tied output head appears once, under its first name)."""
    pruned = {id(m.weight) for m in all_prunable(model).values()}
    return {name: p for name, p in model.named_parameters() if id(p) not in pruned}


@dataclass
class DenseReference:
    """The dense model as the checks need it, taken before pruning: a digest of every fixed
    parameter (no second copy of the embeddings), and the pruned linears' dense weights in their
    storage layout on the CPU (the runner keeps these anyway, to restore them between cells)."""

    fixed: dict  # name -> tensor_digest
    prunable: dict  # linear name -> dense weight (storage layout, CPU)

    @classmethod
    def take(cls, model, prunable_snapshot: dict | None = None) -> "DenseReference":
        snapshot = snapshot_prunable(model) if prunable_snapshot is None else prunable_snapshot
        return cls({name: tensor_digest(p) for name, p in fixed_parameters(model).items()}, snapshot)


def check_fixed_parameters(model, reference: DenseReference) -> int:
    """Every parameter outside the decoder linears' weights is the dense model's; returns how many."""
    current = fixed_parameters(model)
    for name, p in current.items():
        if name not in reference.fixed:
            raise OutputCheckError(f"{name} is a parameter the dense model does not have: a method may change only "
                                   f"the decoder linears' weights")
        if tensor_digest(p) != reference.fixed[name]:
            raise OutputCheckError(f"{name} differs from the dense model's: a method may change only the decoder "
                                   f"linears' weights (embeddings, norms, biases and the output head stay dense)")
    gone = [name for name in reference.fixed if name not in current]
    if gone:
        raise OutputCheckError(f"{gone[0]} is missing after pruning ({len(gone)} parameter(s) of the dense model)")
    return len(current)


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def check_kept_weights(model, reference: DenseReference, *, updates_weights: bool, dense: bool = False,
                       masks: dict | None = None) -> dict | None:
    """The weights each linear kept against its dense ones.  Mask-only (updates_weights False):
    equal, bit for bit; dense: every weight equal.  Updating: finite (checked before) and within
    UPDATE_BOUND times the layer's largest dense weight; returns the relative change of the kept
    weights per linear, ||(W - W_dense) * M||_F / ||W_dense * M||_F with M the kept weights, and
    its summary.  masks: name -> the keep-mask [out, in] the checks count (kept_masks); None: the
    weights' non-zeros."""
    per_layer = {}
    for name, module in all_prunable(model).items():
        w = module.weight.detach().to("cpu")
        d = reference.prunable.get(name)
        if d is None or tuple(d.shape) != tuple(w.shape) or d.dtype != w.dtype:
            raise OutputCheckError(f"{name}.weight is not the dense model's layer any more (shape or dtype changed)")
        if dense:
            if not torch.equal(w, d):
                raise OutputCheckError(f"{name}.weight differs from the dense model's ({int((w != d).sum())} weights), "
                                       f"in a cell that prunes nothing")
            continue
        kept = w != 0 if masks is None else masks[name].to("cpu")
        if masks is not None and is_conv1d(module):
            kept = kept.t()  # masks are [out, in]; w and d here are in storage layout
        if not updates_weights:
            changed = kept & (w != d)
            if bool(changed.any()):
                largest = float((w.float() - d.float()).abs()[changed].max())
                raise OutputCheckError(f"{name}.weight: {int(changed.sum())} kept weight(s) differ from the dense "
                                       f"model's (largest change {largest:.3g}); a method that does not declare weight "
                                       f"updates (Capabilities(updates_weights=True)) may only zero weights")
            continue
        scale = float(d.abs().max()) if d.numel() else 0.0
        peak = float(w.abs().max()) if w.numel() else 0.0
        if peak > UPDATE_BOUND * scale and peak > 0:
            raise OutputCheckError(f"{name}.weight: a kept weight of {peak:.3g} is more than {UPDATE_BOUND:g} times "
                                   f"the layer's largest dense weight ({scale:.3g})")
        dense_kept = torch.where(kept, d, torch.zeros((), dtype=d.dtype)).float()
        change = float(torch.linalg.vector_norm(w.float() - dense_kept))
        base = float(torch.linalg.vector_norm(dense_kept))
        per_layer[name] = _sig(change / base) if base > 0 else (0.0 if change == 0 else None)
    if not updates_weights or dense:
        return None
    values = sorted(v for v in per_layer.values() if v is not None)
    if not values:
        return {"metric": WEIGHT_UPDATE_METRIC, "per_layer": per_layer}
    worst = max((n for n, v in per_layer.items() if v is not None), key=lambda n: per_layer[n])
    return {"metric": WEIGHT_UPDATE_METRIC, "mean": _sig(sum(values) / len(values)),
            "median": _sig(statistics.median(values)),
            "max": per_layer[worst], "max_layer": worst, "per_layer": per_layer}


WEIGHT_UPDATE_METRIC = "relative Frobenius change of each linear's kept weights, ||(W - W_dense) * M||_F / ||W_dense * M||_F"


def check_against_dense(model, reference: DenseReference, *, updates_weights: bool, dense: bool = False,
                        masks: dict | None = None) -> dict:
    """Checks 4 and 5 for one pruned model; returns what the record stores of them:
    {"unchanged_parameters": n, "kept_weights": "unchanged" | "updated" | "dense", "weight_update": ... or None}."""
    n_fixed = check_fixed_parameters(model, reference)
    update = check_kept_weights(model, reference, updates_weights=updates_weights, dense=dense, masks=masks)
    return {"unchanged_parameters": n_fixed,
            "kept_weights": "dense" if dense else ("updated" if updates_weights else "unchanged"),
            "weight_update": update}
