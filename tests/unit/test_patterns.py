"""Sparsity patterns are one class each (prunebench/sparsity/pattern_base.py): a pattern defined
here, in the test file alone, is read, labelled, checked, costed and drawn by the same code as
the built-in ones once it is registered."""
import math
import re

import pandas as pd
import pytest
import torch

from prunebench.errors import UserError
from prunebench.measure import cost, speed
from prunebench.provenance import identity
from prunebench.report.format import format_sparsity_label, sparsity_label_order
from prunebench.report.frame import ok_rows
from prunebench.sparsity import pattern_registry
from prunebench.sparsity.checks import OutputCheckError, check_output, check_pattern, effective_scope
from prunebench.sparsity.n_of_m import NOfM
from prunebench.sparsity.pattern_base import Pattern
from prunebench.sparsity.patterns import SparsitySpec, is_valid_mask

ROWS = "whole-rows"
ROW_FORMAT = "kept rows"
LABEL = re.compile(r"rows:([0-9.]+)")


class WholeRows(Pattern):
    """A toy pattern: whole output rows pruned, `target` of them, written 'rows:0.25'."""

    kind = ROWS
    syntax = "rows:0.25"
    examples = ("rows:0.25",)
    label_rank = 2.2  # after N:M, before dense-or-2:4 tiles
    checked_scope = "layer"

    def parse(self, text):
        match = LABEL.fullmatch(text)
        return None if not match else {"target": float(match.group(1)), "pattern": ROWS}

    def settle(self, spec):
        self.check_target(spec.target)
        self.refuse_tile(spec)
        return {}

    def label(self, spec):
        return f"rows:{spec.target:g}"

    def record_name(self, spec):
        return "whole rows"

    def display_label(self, label):
        match = LABEL.fullmatch(str(label))
        return None if not match else f"{float(match.group(1)) * 100:g}% of rows"

    def label_sort_key(self, label):
        match = LABEL.fullmatch(str(label))
        return None if not match else (self.label_rank, float(match.group(1)), label)

    def reads_record_name(self, name):
        return name == "whole rows"

    def label_from_record(self, name, target):
        return f"rows:{float(target):g}"

    def check(self, name, kept, spec):
        kept = kept != 0
        partial = int((kept.any(dim=1) & ~kept.all(dim=1)).sum())
        return f"{name}: {partial} rows are neither whole nor empty" if partial else None

    def storage_formats(self, spec, rows, cols, kept, value_bytes, *, mask=None, sparsity=None):
        return {ROW_FORMAT: kept * value_bytes + math.ceil(rows / 8)}  # the kept rows, one bit per row

    def random_mask(self, spec, kept, scores, generator):
        rows, cols = scores.shape
        keep = torch.zeros(rows, dtype=torch.bool)
        keep[torch.randperm(rows, generator=generator)[:kept // cols]] = True
        return keep[:, None].expand(rows, cols).clone()


@pytest.fixture
def whole_rows():
    pattern_registry.register_pattern(WholeRows())
    yield SparsitySpec.parse("rows:0.25")
    pattern_registry.unregister_pattern(ROWS)


def rows_mask(rows, cols, pruned_rows):
    mask = torch.ones(rows, cols, dtype=torch.bool)
    mask[list(pruned_rows)] = False
    return mask


def test_a_new_pattern_reads_and_writes_its_spec(whole_rows):
    assert whole_rows.pattern == ROWS and whole_rows.target == 0.25
    assert whole_rows.label == "rows:0.25" and SparsitySpec.parse(whole_rows.label) == whole_rows
    assert whole_rows.to_dict() == {"target": 0.25, "pattern": "whole rows", "n": 0, "m": 0, "scope": None}
    assert whole_rows.resolved("row") is whole_rows  # not a scoped pattern
    assert "rows:0.25" in pattern_registry.example_specs()  # the conformance suite runs it
    with pytest.raises(UserError, match="only a hybrid spec has a tile size"):
        SparsitySpec(0.25, ROWS, tile=8)


def test_a_new_pattern_is_checked_by_the_runners_checks(whole_rows):
    good = rows_mask(8, 16, [1, 4])
    weights = torch.randn(8, 16) * good
    assert effective_scope(whole_rows, "row") == "layer"
    check_output([("a", weights)], whole_rows, "layer")
    check_output([("a", weights)], whole_rows, "layer", masks={"a": good})
    assert is_valid_mask(good, whole_rows)
    bad = good.clone()
    bad[0, :4] = False
    with pytest.raises(OutputCheckError, match="1 rows are neither whole nor empty"):
        check_output([("a", torch.randn(8, 16) * bad)], whole_rows, "layer")
    with pytest.raises(OutputCheckError, match="per-layer target"):  # the amount, at the pattern's scope
        check_output([("a", torch.randn(8, 16) * rows_mask(8, 16, [1]))], whole_rows, None)


def test_a_new_pattern_brings_its_storage_format_and_draws_its_masks(whole_rows):
    masks = {"a": rows_mask(8, 16, [1, 4]), "b": rows_mask(16, 16, range(4))}
    a, b = cost.linears_for_spec(masks, whole_rows)
    assert a.formats[ROW_FORMAT] == 96 * 2 + 1 and a.best == ROW_FORMAT and a.flops_per_token == 2 * 96
    assert b.formats[ROW_FORMAT] == 192 * 2 + 2 and b.best == ROW_FORMAT
    shape = cost.ModelShape(hidden=16, vocab=32, layers=1, other_params=0, head_tied=True)
    total = cost.model_cost([a, b], shape)
    assert total["formats"] == {ROW_FORMAT: 2} and total["linear_bytes"] == 96 * 2 + 1 + 192 * 2 + 2
    record = {"method": {"name": "toy"}, "sparsity": {"label": "rows:0.25", "pattern": "whole rows",
                                                      "per_layer": {"a": 0.25, "b": 0.25}}}
    linears = cost.record_linears(record, {"a": (8, 16), "b": (16, 16)})
    assert [c.best for c in linears] == [ROW_FORMAT, ROW_FORMAT] and [c.kept for c in linears] == [96, 192]
    for name, mask in speed.masks_like(linears).items():
        assert is_valid_mask(mask, whole_rows) and int(mask.sum()) == dict(a=96, b=192)[name]


def test_a_new_pattern_labels_itself_in_the_report(whole_rows):
    assert format_sparsity_label("rows:0.25") == "25% of rows"
    labels = ["hybrid:0.35/64", "rows:0.5", "2:4", "0.5", "rows:0.25", "dense"]
    assert sorted(labels, key=sparsity_label_order) == ["dense", "0.5", "2:4", "rows:0.25", "rows:0.5", "hybrid:0.35/64"]
    frame = pd.DataFrame([{"method": "toy", "pattern": "whole rows", "sparsity": 0.25}])
    assert ok_rows(frame)["sparsity_label"].tolist() == ["rows:0.25"]


def test_an_unregistered_pattern_is_one_clear_error(whole_rows):
    pattern_registry.unregister_pattern(ROWS)
    with pytest.raises(UserError) as caught:
        pattern_registry.pattern_of(ROWS)
    assert "\n" not in str(caught.value) and "unstructured, nm, hybrid" in str(caught.value)
    with pytest.raises(UserError, match="cannot read sparsity 'rows:0.25'"):
        SparsitySpec.parse("rows:0.25")
    assert format_sparsity_label("rows:0.25") == "rows:0.25"  # an unknown label prints as it is


def test_every_builtin_patterns_file_is_in_every_cells_key():
    for pattern in pattern_registry.BUILTIN_PATTERNS:
        assert type(pattern).__module__ in identity.METHOD_FRAMEWORK_MODULES
    assert {"prunebench.sparsity.pattern_base", "prunebench.sparsity.pattern_registry"} <= set(
        identity.METHOD_FRAMEWORK_MODULES)


def test_a_replacement_pattern_decides_the_pattern_check():
    spec = SparsitySpec.parse("2:4")
    good = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4]])
    check_pattern([("w", good)], spec)
    with pytest.raises(OutputCheckError, match="keep more than 2"):
        check_pattern([("w", torch.ones(1, 8))], spec)
    calls = []

    class Lenient(NOfM):
        def check(self, name, kept, spec):
            calls.append(name)
            return None

    builtin = pattern_registry.register_pattern(Lenient())
    try:
        check_pattern([("w", torch.ones(1, 8))], spec)  # the replacement pattern's check decides now
        assert calls == ["w"]
    finally:
        pattern_registry.register_pattern(builtin)
