"""What a sparsity pattern is to prunebench: one class, everything it means in one file.

A pattern is the rule a keep-mask follows (unstructured, N:M, dense-or-2:4 tiles).  Its class
owns, for that rule:

- the spec: reading it from CLI and grid text (`parse`), checking and completing a spec's
  fields (`settle`), its canonical label ('2:4') and the name records store ('2:4',
  'dense|2:4 tiles'), and any extra field records store (`record_fields`);
- labels as text, for the report: how a label prints ('0.5' -> '50%') and sorts, and what a
  record's stored pattern name says;
- the output check: is a keep-mask of this pattern (`check`), and the scope its amount is
  checked at when the pattern fixes it;
- cost: the storage formats a mask of this pattern can use beyond dense, bitmask and CSR, and
  its FLOPs per token;
- speed: a random mask of this pattern with a given kept count (prunebench.measure.speed).

A new pattern is one file holding a subclass, added to BUILTIN_PATTERNS in
prunebench/sparsity/pattern_registry.py (or registered at run time with `register_pattern`).
Methods name the patterns they support by `kind` (Capabilities.patterns).
"""
from __future__ import annotations

import math

import torch

from prunebench.errors import UserError

# Labels print fractions as percent.
PERCENT = 100.0
# A multiply-add is two FLOPs: a linear that skips the zeros computes 2 per kept weight and token.
FLOPS_PER_KEPT_WEIGHT = 2


class Pattern:
    """Base class.  Subclasses set the class attributes and implement the methods that raise."""

    kind: str = ""  # a SparsitySpec's `pattern` field and a method's Capabilities.patterns entry
    syntax: str = ""  # how to write it, for hints: "N:M such as 2:4"
    examples: tuple = ()  # spec texts the conformance suite runs, where a method supports the pattern
    label_rank: float = 0.0  # where its labels sort in reports: dense 0, then by rank, unknown labels last
    scoped: bool = False  # the amount is chosen per row or per layer: a spec without a scope takes the method's
    # the scope the amount is checked at whatever the method reports (None: the method's own)
    checked_scope: str | None = None
    # the pattern alone fixes the amount (N:M keeps N of every M): a plot shows a point, not a line
    fixed_target: bool = False

    # -- the spec --------------------------------------------------------------------------------

    def parse(self, text: str) -> dict | None:
        """SparsitySpec fields from stripped CLI or grid text written in this pattern's syntax;
        None when the text is not in it; UserError when it is but cannot be read."""
        raise NotImplementedError

    def settle(self, spec) -> dict:
        """Check a new spec's fields (UserError with a hint if wrong); the fields to set on it
        (a default filled in, a target the pattern fixes)."""
        raise NotImplementedError

    def label(self, spec) -> str:
        """The short, stable text form of a spec, which parses back to it ('2:4')."""
        raise NotImplementedError

    def record_name(self, spec) -> str:
        """What a record stores as the spec's pattern ('unstructured', '2:4')."""
        raise NotImplementedError

    def record_fields(self, spec) -> dict:
        """Fields a record's sparsity (SparsitySpec.to_dict) holds beside target, pattern, n, m, scope."""
        return {}

    # -- labels and stored names as text (records, the report) ------------------------------------

    def display_label(self, label) -> str | None:
        """How a label of this pattern prints in tables ('0.5' -> '50%'); None if not its label."""
        raise NotImplementedError

    def label_sort_key(self, label) -> tuple | None:
        """(label_rank, amount, label) for a label of this pattern; None if not its label."""
        raise NotImplementedError

    def reads_record_name(self, name: str) -> bool:
        """Is `name` what record_name gives for a spec of this pattern?"""
        raise NotImplementedError

    def label_from_record(self, name: str, target) -> str:
        """A label for a record row that stores a pattern name and a target but no label."""
        return name

    def nominal_sparsity(self, name: str, target) -> float:
        """The fraction of weights a record row with this pattern name and target removes."""
        return float(target)

    # -- the output check -------------------------------------------------------------------------

    def check(self, name: str, kept: torch.Tensor, spec) -> str | None:
        """Does [out, in] `kept` (its zeros, or False, are pruned) follow the pattern?  None, or
        a one-line reason naming the linear.  The amount is checked elsewhere (checks.check_sparsity)."""
        raise NotImplementedError

    def is_valid_mask(self, mask: torch.Tensor, spec, tol: float = 0.0) -> bool:
        """Does the bool keep-mask satisfy the spec (prunebench.sparsity.patterns.is_valid_mask)?"""
        return self.check("mask", mask, spec) is None

    # -- cost and speed ---------------------------------------------------------------------------

    def storage_formats(self, spec, rows: int, cols: int, kept: int, value_bytes: int, *,
                        mask: torch.Tensor | None = None, sparsity: float | None = None) -> dict:
        """format name -> bytes of an [rows, cols] linear keeping `kept` weights, for the formats
        this pattern adds to dense, bitmask and CSR (which any mask can use).  `mask`: the
        keep-mask where there is one; else `sparsity`, the linear's sparsity a record gives."""
        return {}

    def flops_per_token(self, kept: int) -> int:
        """FLOPs per token of a linear of this pattern keeping `kept` weights."""
        return FLOPS_PER_KEPT_WEIGHT * kept

    def random_mask(self, spec, kept: int, scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A bool keep-mask shaped like `scores` that follows the spec and keeps `kept` weights at
        random positions: `scores` are uniform random scores the caller drew, `generator` draws
        anything else."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------------

    @staticmethod
    def check_target(target) -> None:
        """Every spec's target is a fraction in [0, 1)."""
        if not (isinstance(target, (int, float)) and math.isfinite(target) and 0.0 <= target < 1.0):
            raise UserError(f"sparsity {target!r} is outside [0, 1)", hint="e.g. 0.5 for 50% unstructured, or 2:4")

    @staticmethod
    def refuse_tile(spec) -> None:
        """Only a tiled pattern has a tile size."""
        if spec.tile:
            raise UserError("only a hybrid spec has a tile size", hint="e.g. hybrid:0.35/64")
