"""The sparsity patterns prunebench knows, by kind, and what reads labels and stored names through them.

BUILTIN_PATTERNS lists one instance per pattern file; `register_pattern` adds one at run time (a
plugin's, a test's).  Their order is the order specs are parsed in and conformance examples run.
"""
from __future__ import annotations

from prunebench.errors import UserError
from prunebench.sparsity.hybrid import HybridTiles
from prunebench.sparsity.n_of_m import NOfM
from prunebench.sparsity.pattern_base import Pattern
from prunebench.sparsity.unstructured import Unstructured

BUILTIN_PATTERNS = (Unstructured(), NOfM(), HybridTiles())
# A label no pattern reads sorts after every pattern's (dense sorts first, at 0).
UNKNOWN_LABEL_RANK = 3

_registered: dict[str, Pattern] = {pattern.kind: pattern for pattern in BUILTIN_PATTERNS}


def register_pattern(pattern: Pattern) -> Pattern | None:
    """Add `pattern` under its kind (replacing any there: returned, so a caller can put it back)."""
    if not pattern.kind:
        raise ValueError(f"{type(pattern).__name__} sets no kind")
    previous = _registered.get(pattern.kind)
    _registered[pattern.kind] = pattern
    return previous


def unregister_pattern(kind: str) -> None:
    _registered.pop(kind, None)


def known_patterns() -> tuple:
    return tuple(_registered.values())


def pattern_of(kind: str) -> Pattern:
    """The pattern registered under `kind` (a SparsitySpec's `pattern` field)."""
    pattern = _registered.get(kind)
    if pattern is None:
        raise UserError(f"unknown sparsity pattern {kind!r}", hint=f"use one of {', '.join(_registered)}")
    return pattern


def builtin_pattern_modules() -> tuple:
    """The modules of the built-in patterns (what a cell's key hashes, with the spec's code)."""
    return tuple(type(pattern).__module__ for pattern in BUILTIN_PATTERNS)


def spec_syntax() -> str:
    """How specs are written, every pattern's way, for a hint."""
    return "; ".join(pattern.syntax for pattern in _registered.values())


def example_specs() -> tuple:
    """Every pattern's example spec texts (the conformance suite runs them)."""
    return tuple(text for pattern in _registered.values() for text in pattern.examples)


# -- labels and stored pattern names as text -------------------------------------------------------

def display_label(label) -> str:
    """How a sparsity label prints in tables ('0.5' -> '50%'); a label no pattern reads, as it is."""
    for pattern in _registered.values():
        text = pattern.display_label(label)
        if text is not None:
            return text
    return label


def label_sort_key(label) -> tuple:
    """(rank, amount, label): labels sorted by pattern rank, then by amount."""
    for pattern in _registered.values():
        key = pattern.label_sort_key(label)
        if key is not None:
            return key
    return (UNKNOWN_LABEL_RANK, 0.0, label)


def pattern_of_record_name(name: str) -> Pattern | None:
    """The pattern whose record_name `name` is (a record's sparsity.pattern), or None."""
    for pattern in _registered.values():
        if pattern.reads_record_name(name):
            return pattern
    return None


def label_from_record(name: str, target) -> str:
    """A label for a record row that stores its pattern name and target but no label."""
    pattern = pattern_of_record_name(name)
    return name if pattern is None else pattern.label_from_record(name, target)


def nominal_sparsity(name: str, target) -> float:
    """The fraction of weights removed by a record row's pattern name and target."""
    pattern = pattern_of_record_name(name)
    return float(target) if pattern is None else pattern.nominal_sparsity(name, target)
