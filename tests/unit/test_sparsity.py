import pytest
import torch

from prunebench.errors import UserError
from prunebench.sparsity.patterns import (
    SparsitySpec, is_valid_mask, mask_from_scores, measure_sparsity, nm_mask, pack_mask, unpack_mask
)


@pytest.mark.parametrize("text,target,pattern,n,m,scope", [
    ("0.5", 0.5, "unstructured", 0, 0, None),
    ("50%", 0.5, "unstructured", 0, 0, None),
    ("0.6@layer", 0.6, "unstructured", 0, 0, "layer"),
    ("0.7@row", 0.7, "unstructured", 0, 0, "row"),
    ("2:4", 0.5, "nm", 2, 4, None),
    ("4:8", 0.5, "nm", 4, 8, None),
    ("1:3", 2 / 3, "nm", 1, 3, None),
    ("0", 0.0, "unstructured", 0, 0, None),
])
def test_parse(text, target, pattern, n, m, scope):
    s = SparsitySpec.parse(text)
    assert s.target == pytest.approx(target) and s.pattern == pattern and (s.n, s.m) == (n, m) and s.scope == scope


@pytest.mark.parametrize("bad", ["1.0", "1", "-0.1", "4:4", "5:4", "abc", "0.5@column", "nan", "2:0"])
def test_bad_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        SparsitySpec.parse(bad)


def test_row_scope_prunes_exactly_per_row():
    torch.manual_seed(0)
    scores = torch.randn(7, 10)
    mask = mask_from_scores(scores, SparsitySpec(0.6, scope="row"))
    assert (mask.sum(1) == 4).all()
    # the kept weights are each row's four largest
    top = scores.topk(4, dim=1).indices
    assert torch.equal(torch.zeros_like(mask).scatter_(1, top, True), mask)


def test_layer_scope_uses_one_threshold():
    torch.manual_seed(0)
    scores = torch.randn(8, 16)
    mask = mask_from_scores(scores, SparsitySpec(0.5, scope="layer"))
    assert mask.sum() == 64
    assert scores[mask].min() >= scores[~mask].max()


def test_nm_mask_keeps_n_of_every_m_and_handles_a_tail():
    torch.manual_seed(0)
    scores = torch.randn(5, 18)  # 4 full groups of 4 and a tail of 2
    mask = nm_mask(scores, 2, 4)
    groups = mask[:, :16].reshape(5, 4, 4).sum(-1)
    assert (groups == 2).all()
    assert (mask[:, 16:].sum(1) == 1).all()
    assert is_valid_mask(mask, SparsitySpec.parse("2:4"))
    bad = mask.clone()
    bad[:, :4] = True
    assert not is_valid_mask(bad, SparsitySpec.parse("2:4"))


def test_transposed_scores_work():  # GPT-2's Conv1D weights reach us as a transposed view
    scores = torch.randn(12, 8).t()
    for spec in ("0.5@layer", "0.5@row", "2:4"):
        m = mask_from_scores(scores, SparsitySpec.parse(spec))
        assert m.shape == (8, 12) and m.float().mean() == pytest.approx(0.5)


def test_pack_roundtrip_and_measure():
    torch.manual_seed(1)
    mask = torch.rand(13, 11) > 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (13 * 11 + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    w = torch.randn(13, 11) * mask
    m = measure_sparsity([("a", w), ("b", torch.zeros(2, 2))])
    assert m["per_layer"]["b"] == 1.0
    assert m["overall"] == pytest.approx(((~mask).sum().item() + 4) / (143 + 4))


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_selection_equals_a_stable_sort_even_with_ties(scope):
    torch.manual_seed(3)
    for scores in (torch.randint(0, 4, (9, 12)).float(), torch.randn(6, 40)):
        for target in (0.25, 0.5, 0.6):
            spec = SparsitySpec(target, scope=scope)
            expected = torch.ones_like(scores, dtype=torch.bool)
            if scope == "layer":
                k = int(scores.numel() * target)
                expected.view(-1)[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
            else:
                k = int(scores.shape[1] * target)
                expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)
            assert torch.equal(mask_from_scores(scores, spec), expected)
