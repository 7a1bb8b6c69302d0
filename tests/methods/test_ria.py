"""RIA (methods/ria.py): the score by hand, the comparison groups, N:M, the channel permutation
search, config validation, and a tiny-model run through the layer-wise engine."""
import itertools
import math

import pytest
import torch

from prunebench import registry
from prunebench.run.conformance import prune_tiny
from prunebench.errors import UserError
from prunebench.contract import LayerStats
from prunebench.sparsity.patterns import SparsitySpec, is_valid_mask, nm_mask

registry.available()  # registers the built-ins, so prunebench.methods.ria is importable
from prunebench.methods.ria import (  # noqa: E402
    RIA, channel_permutation, lsa_refine, nm_kept_score, permuted_nm_mask, relative_importance, ria_mask,
    ria_scores, zigzag_permutation)


def _stats(sq_mean) -> LayerStats:
    return LayerStats(n_tokens=10, input_sq_mean=torch.as_tensor(sq_mean, dtype=torch.float32))


def _resolved(text: str, pruner) -> SparsitySpec:
    return SparsitySpec.parse(text).resolved(pruner.default_scope)


def test_score_against_a_hand_computation():
    rows = [[1.0, -2.0, 3.0], [4.0, 0.0, -6.0]]
    sq_mean = [1.0, 4.0, 9.0]  # input norms 1, 2, 3
    col_sums = [sum(abs(r[j]) for r in rows) for j in range(3)]
    row_sums = [sum(abs(v) for v in r) for r in rows]
    for a in (0.5, 1.0, 0.0):
        expected = [[(abs(rows[i][j]) / col_sums[j] + abs(rows[i][j]) / row_sums[i]) * math.sqrt(sq_mean[j]) ** a
                     for j in range(3)] for i in range(2)]
        got = ria_scores(torch.tensor(rows), _stats(sq_mean).input_norm, a)
        assert torch.allclose(got, torch.tensor(expected), rtol=1e-6, atol=0), a
    # e.g. W_00: (1/5 + 1/6) * 1 ** 0.5;  W_12: (6/9 + 6/10) * 3 ** 0.5
    got = ria_scores(torch.tensor(rows), _stats(sq_mean).input_norm)
    assert got[0, 0].item() == pytest.approx(1 / 5 + 1 / 6)
    assert got[1, 2].item() == pytest.approx((6 / 9 + 6 / 10) * 3 ** 0.5)


def test_all_zero_column_scores_zero_here_and_nan_in_the_reference_arithmetic():
    w = torch.tensor([[1.0, 0.0, 2.0, 3.0], [2.0, 0.0, 1.0, 5.0]])
    ri = relative_importance(w)
    assert torch.isfinite(ri).all() and (ri[:, 1] == 0).all()
    assert torch.isnan(relative_importance(w, zero_sum_nan=True)[:, 1]).all()
    norm = torch.ones(4)
    spec = SparsitySpec(0.5, scope="layer")
    ours = ria_mask(ria_scores(w, norm), spec)
    assert not ours[:, 1].any() and int((~ours).sum()) == 4  # the zero weights go first, exactly 4 pruned
    theirs = ria_mask(ria_scores(w, norm, zero_sum_nan=True), spec, reference=True)
    assert theirs[:, 1].all()  # NaN is never pruned: the zero column counts as kept


def test_layer_and_row_groups_differ_and_each_prunes_the_exact_count():
    g = torch.Generator().manual_seed(0)
    w = 1 + torch.rand(4, 7, generator=g)
    w[0] *= 10  # one row dominates every column's sum: a layer-wide threshold spares it
    stats = _stats(torch.rand(7, generator=g) + 0.5)
    layer, row = RIA(), RIA(per_outneuron=True)
    assert layer.default_scope == "layer" and row.default_scope == "row"
    for target in (0.5, 0.6):
        spec_l, spec_r = _resolved(str(target), layer), _resolved(str(target), row)
        assert spec_l.scope == "layer" and spec_r.scope == "row"
        m_layer = layer.prune_linear(w.clone(), stats, spec_l, None).mask
        m_row = row.prune_linear(w.clone(), stats, spec_r, None).mask
        assert int((~m_layer).sum()) == int(28 * target)  # 14, 16
        assert ((~m_row).sum(dim=1) == int(7 * target)).all()  # 3, 4 in every row
        assert m_layer[0].all() and not torch.equal(m_layer, m_row)
        # the explicit spec scope does the same as the option
        assert torch.equal(layer.prune_linear(w.clone(), stats, SparsitySpec(target, scope="row"), None).mask, m_row)


def test_reference_layer_selection_prunes_one_more_and_every_tie():
    scores = torch.arange(10.0).reshape(2, 5)
    spec = SparsitySpec(0.5, scope="layer")
    assert int((~ria_mask(scores, spec)).sum()) == 5
    assert int((~ria_mask(scores, spec, reference=True)).sum()) == 6
    ties = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])
    assert (~ria_mask(ties, SparsitySpec(0.2, scope="layer"))).nonzero()[:, 1].tolist() == [0]
    assert int((~ria_mask(ties, SparsitySpec(0.2, scope="layer"), reference=True)).sum()) == 4
    # per row the authors' stable sort counts int(in * s), as prunebench does
    assert torch.equal(ria_mask(scores, SparsitySpec(0.5, scope="row"), reference=True),
                       ria_mask(scores, SparsitySpec(0.5, scope="row")))


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_masks_keep_the_top_n_of_every_group(nm):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 24, generator=g)
    stats = _stats(torch.rand(24, generator=g))
    spec = SparsitySpec.parse(nm)
    mask = RIA().prune_linear(w, stats, spec, None).mask
    assert is_valid_mask(mask, spec)
    groups = mask.reshape(6, -1, spec.m)
    assert (groups.sum(-1) == spec.n).all()
    scores = ria_scores(w, stats.input_norm).reshape(6, -1, spec.m)
    kept_min = torch.where(groups, scores, torch.full_like(scores, math.inf)).min(-1).values
    pruned_max = torch.where(groups, torch.full_like(scores, -math.inf), scores).max(-1).values
    assert (kept_min >= pruned_max).all()


def _is_permutation(perm, n):
    return sorted(perm.tolist()) == list(range(n))


def test_zigzag_interleaves_weak_and_strong_columns_and_raises_the_kept_score():
    # columns 0-3 strong, 4-7 weak: without a permutation the first 2:4 group must drop two strong ones
    s = torch.tensor([[10.0, 9.0, 8.0, 7.0, 1.0, 0.5, 0.25, 0.125]] * 3)
    perm = zigzag_permutation(s, 4)
    assert _is_permutation(perm, 8)
    # ascending order 7 6 5 4 3 2 1 0 in chunks of 2: slot 0 <- (7, 6), slot 1 <- (4, 5), slot 2 <- (3, 2), slot 3 <- (0, 1)
    assert perm.tolist() == [7, 4, 3, 0, 6, 5, 2, 1]
    assert nm_kept_score(s, 2, 4) == pytest.approx(3 * (19 + 1.5))
    assert nm_kept_score(s, 2, 4, perm) == pytest.approx(3 * 34)
    mask = permuted_nm_mask(s, perm, 2, 4)
    assert is_valid_mask(mask[:, perm], SparsitySpec.parse("2:4")) and mask[:, :4].all() and not mask[:, 4:].any()
    with pytest.raises(ValueError):
        zigzag_permutation(torch.rand(2, 6), 4)


def test_lsa_refinement_returns_a_permutation_and_raises_the_kept_score():
    pytest.importorskip("scipy")
    s = torch.rand(16, 32, generator=torch.Generator().manual_seed(0)) ** 3
    zig = zigzag_permutation(s, 4)
    refined = lsa_refine(s, zig, 2, 4)
    assert _is_permutation(refined, 32)
    assert nm_kept_score(s, 2, 4, refined) > nm_kept_score(s, 2, 4, zig) + 1.0 > nm_kept_score(s, 2, 4) + 1.0
    mask = permuted_nm_mask(s, refined, 2, 4)
    assert is_valid_mask(mask[:, refined], SparsitySpec.parse("2:4"))
    assert float((s * mask).sum()) == pytest.approx(nm_kept_score(s, 2, 4, refined))
    assert torch.equal(channel_permutation(s, 2, 4), refined)


def test_channel_permutation_never_loses_to_the_identity_and_never_beats_the_optimum():
    pytest.importorskip("scipy")
    s = torch.rand(16, 32, generator=torch.Generator().manual_seed(2)) ** 3
    # here the zig-zag heuristic alone lowers the kept score: ours then keeps the original order
    assert nm_kept_score(s, 2, 4, zigzag_permutation(s, 4)) < nm_kept_score(s, 2, 4)
    assert channel_permutation(s, 2, 4, lsa=False).tolist() == list(range(32))
    assert nm_kept_score(s, 2, 4, channel_permutation(s, 2, 4)) > nm_kept_score(s, 2, 4)
    # small enough to try every grouping of 8 columns into two 2:4 groups
    t = torch.rand(5, 8, generator=torch.Generator().manual_seed(3)) ** 2
    best = max(nm_kept_score(t, 2, 4, torch.tensor(list(c) + [j for j in range(8) if j not in c]))
               for c in itertools.combinations(range(8), 4))
    found = nm_kept_score(t, 2, 4, channel_permutation(t, 2, 4, rounds=2))
    assert nm_kept_score(t, 2, 4) <= found <= best + 1e-5


@pytest.mark.parametrize("config", [{"a": -0.5}, {"a": float("nan")}, {"selection": "threshold"}, {"alpha": 1.0}])
def test_bad_config_is_refused(config):
    with pytest.raises(UserError):
        registry.create("ria", config)


def test_per_outneuron_refuses_a_layer_scope():
    pruner = registry.create("ria", {"per_outneuron": True})
    with pytest.raises(UserError):
        pruner.check_spec(SparsitySpec.parse("0.5@layer"))
    pruner.check_spec(SparsitySpec.parse("0.5"))
    pruner.check_spec(SparsitySpec.parse("2:4"))


def test_tiny_model_runs_through_the_engine(calib_windows):
    weights, report = prune_tiny("ria", "llama", SparsitySpec.parse("0.5"), calib_windows)
    assert report.stats["scope"] == "layer"
    for name, w in weights.items():
        assert int((w == 0).sum()) == int(w.numel() * 0.5), name
    weights, report = prune_tiny("ria", "llama", SparsitySpec.parse("0.6"), calib_windows, config={"per_outneuron": True})
    assert report.stats["scope"] == "row"
    for name, w in weights.items():
        assert ((w == 0).sum(dim=1) == int(w.shape[1] * 0.6)).all(), name
    spec = SparsitySpec.parse("2:4")
    weights, _ = prune_tiny("ria", "llama", spec, calib_windows)
    assert all(is_valid_mask(w != 0, spec) for w in weights.values())
    # the activations matter: RIA at a = 0 (relative importance alone) picks other masks
    plain, _ = prune_tiny("ria", "llama", spec, calib_windows, config={"a": 0.0})
    assert any(not torch.equal(weights[n] != 0, plain[n] != 0) for n in weights)
