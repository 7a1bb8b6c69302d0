"""Layer-wise reconstruction methods (SparseGPT, ADMM) on synthetic layers: pure tensors, no model.

The layer's inputs are strongly correlated and have very different column scales, which is the
regime where the methods differ: weight updates beat plain masking, activation-aware masks beat
magnitude.
"""
import pytest
import torch

from prunebench import registry
from prunebench.contract import LayerStats
from prunebench.sparsity.patterns import SparsitySpec, is_valid_mask, mask_from_scores, n_to_prune, nm_mask

from prunebench.methods.admm import _early_two_of_four, _pair_bounds, admm_prune, cubic_sparsity, select_mask, two_of_four
from prunebench.methods.sparsegpt import (CholeskyError, damped_inverse_cholesky, prepare_hessian,
                                          sparsegpt_prune)

from synthetic_layers import make_layer, one_thread, prune_one, recon_error  # noqa: F401 (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reconstruction_error_orders_the_methods():
    X, W, stats = make_layer()
    spec = SparsitySpec(0.5)
    errs = {name: recon_error(X, W, prune_one(name, W, stats, spec)[1])
            for name in ("admm", "sparsegpt", "wanda", "magnitude")}
    assert errs["admm"] <= errs["sparsegpt"] <= errs["wanda"] <= errs["magnitude"], errs


@pytest.mark.parametrize("name", ["sparsegpt", "admm"])
@pytest.mark.parametrize("scope", [None, "row", "layer"])
def test_unstructured_sparsity_is_exact(name, scope):
    _, W, stats = make_layer(d_in=96, d_out=40)
    res, new_w, spec = prune_one(name, W, stats, SparsitySpec(0.6, scope=scope))
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape
    assert is_valid_mask(res.mask, spec)
    if spec.scope == "row":  # the same count in every row (rounded per row, as mask_from_scores does)
        assert ((~res.mask).sum(dim=1) == int(0.6 * W.shape[1])).all()
    else:
        assert int((~res.mask).sum()) == int(0.6 * W.numel())
    assert (new_w[~res.mask] == 0).all()
    assert torch.isfinite(new_w).all()


@pytest.mark.parametrize("name", ["sparsegpt", "admm"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 3)])
def test_nm_masks_are_valid(name, nm):
    _, W, stats = make_layer(d_in=128, d_out=32)  # 128 is not a multiple of 3: a short tail group
    spec = SparsitySpec.parse(f"{nm[0]}:{nm[1]}")
    res, new_w, _ = prune_one(name, W, stats, spec)
    assert is_valid_mask(res.mask, spec)
    n, m = nm
    full = W.shape[1] - W.shape[1] % m
    kept = res.mask[:, :full].reshape(W.shape[0], -1, m).sum(-1)
    assert (kept == n).all()  # exactly N, not merely at most N
    assert (new_w[~res.mask] == 0).all()


@pytest.mark.parametrize("name", ["sparsegpt", "admm"])
def test_same_inputs_same_result(name):
    _, W, stats = make_layer(d_in=64, d_out=32)
    a, wa, _ = prune_one(name, W, stats, SparsitySpec(0.5))
    b, wb, _ = prune_one(name, W, stats, SparsitySpec(0.5))
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(wa, wb)


def test_admm_frozen_mask_reaches_the_masked_least_squares_optimum():
    # Small, well-posed layer; the mask is Wanda's. Per row, the optimum on the kept set S solves
    # H[S, S] w_S = H[S, :] w_orig (here with percdamp=0 so H is the plain X^T X / n).
    X, W, stats = make_layer(seed=3, n=1024, d_in=32, d_out=8, rank=2)
    H = stats.hessian.double()
    mask = mask_from_scores(W.abs() * stats.input_norm, SparsitySpec(0.5, scope="row"))

    def exact(Hm):
        out = torch.zeros_like(W, dtype=torch.float64)
        for r in range(W.shape[0]):
            S = mask[r].nonzero().squeeze(1)
            out[r, S] = torch.linalg.solve(Hm[S][:, S], (Hm @ W[r].double())[S])
        return out

    w_admm, m_out = admm_prune(stats.hessian, W, mask=mask, percdamp=0.0, final_iterations=2000)
    assert torch.equal(m_out, mask)
    ref = exact(H)
    rel = ((w_admm.double() - ref).norm(dim=1) / ref.norm(dim=1)).max()
    assert rel < 1e-4, float(rel)

    # With the default dampening the optimum is that of H + percdamp * diag(H): the normalised
    # problem's ridge, seen in the original coordinates.
    w_admm, _ = admm_prune(stats.hessian, W, mask=mask, percdamp=0.1, final_iterations=2000)
    ref = exact(H + 0.1 * torch.diag(torch.diagonal(H)))
    rel = ((w_admm.double() - ref).norm(dim=1) / ref.norm(dim=1)).max()
    assert rel < 1e-4, float(rel)


def test_admm_mask_from_wanda():
    X, W, stats = make_layer(seed=1)
    spec = SparsitySpec(0.5)
    wanda, w_wanda, wanda_spec = prune_one("wanda", W, stats, spec)
    res, w_admm, admm_spec = prune_one("admm", W, stats, spec, mask_from="wanda")
    assert admm_spec == wanda_spec  # an unscoped spec resolves with the source's default scope
    assert torch.equal(res.mask, wanda.mask)
    assert recon_error(X, W, w_admm) <= recon_error(X, W, w_wanda)
    assert (w_admm[~res.mask] == 0).all()


def test_bad_configs_are_rejected_early():
    with pytest.raises(Exception, match="unknown method"):
        registry.create("admm", mask_from="no-such-method")
    with pytest.raises(Exception, match="not a layer-wise method"):
        registry.create("admm", mask_from="dense")
    with pytest.raises(Exception, match="unknown option"):
        registry.create("admm", mask_from="wanda", mask_from_config={"bogus": 1})
    with pytest.raises(Exception, match="rho > 0"):
        registry.create("admm", rho=0)
    with pytest.raises(Exception, match="blocksize >= 1"):
        registry.create("sparsegpt", blocksize=0)


def test_sparsegpt_retries_cholesky_with_more_dampening():
    # Unit diagonal, off-diagonal -0.9: eigenvalues 1.9 and 1.9 - 0.9 n (very negative) but a
    # positive diagonal, so only a dampening above ~27 x the mean diagonal makes it PD.
    n = 32
    H = 1.9 * torch.eye(n) - 0.9 * torch.ones(n, n)
    W = torch.randn(8, n, generator=torch.Generator().manual_seed(0))
    stats = LayerStats(n_tokens=100, hessian=H)
    res, new_w, _ = prune_one("sparsegpt", W, stats, SparsitySpec(0.5))
    assert len(res.warnings) == 4  # 0.01 -> 0.1 -> 1 -> 10 -> 100
    assert "percdamp=0.01" in res.warnings[0] and "percdamp=100" in res.warnings[-1]
    assert torch.isfinite(new_w).all()

    with pytest.raises(CholeskyError, match="percdamp in 0.01, 0.1, 1"):
        prune_one("sparsegpt", W, stats, SparsitySpec(0.5), max_damp_retries=2)


def test_sparsegpt_rejects_what_dampening_cannot_fix():
    W = torch.randn(4, 16)
    with pytest.raises(CholeskyError, match="negative diagonal"):
        prune_one("sparsegpt", W, LayerStats(10, hessian=-torch.eye(16) - 0.1), SparsitySpec(0.5))
    bad = torch.eye(16)
    bad[3, 5] = float("nan")
    with pytest.raises(CholeskyError, match="NaN"):
        prune_one("sparsegpt", W, LayerStats(10, hessian=bad), SparsitySpec(0.5))


def test_sparsegpt_matches_explicit_obs():
    # The Cholesky / lazy-batch implementation against the textbook sequence of OBS steps: for
    # each column i in order, with F = the columns not yet visited, prune the chosen rows of
    # column i and move the error onto F through (H_F)^-1.
    _, W, stats = make_layer(seed=2, n=512, d_in=24, d_out=6, rank=2)
    H, Wp, _ = prepare_hessian(stats.hessian, W)
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(24)
    hinv, _, warns = damped_inverse_cholesky(H, 0.01)
    assert not warns
    spec = SparsitySpec.parse("2:4")
    new_w, mask = sparsegpt_prune(Wp, hinv, spec, blocksize=8)

    ref = Wp.double().clone()
    Hd64 = Hd.double()
    for i in range(24):
        Finv = torch.linalg.inv(Hd64[i:, i:])
        err = torch.where(mask[:, i], torch.zeros(6, dtype=torch.float64), ref[:, i] / Finv[0, 0])
        ref[:, i:] -= err.unsqueeze(1) * Finv[0].unsqueeze(0)
        ref[:, i] = torch.where(mask[:, i], ref[:, i], torch.zeros(6, dtype=torch.float64))
    assert torch.allclose(new_w.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max())

    # N:M masks do not depend on the lazy-update block size (groups never straddle blocks).
    for bs in (3, 4, 24, 128):
        w2, m2 = sparsegpt_prune(Wp, hinv, spec, blocksize=bs)
        assert torch.equal(m2, mask)
        assert torch.allclose(w2, new_w, rtol=1e-4, atol=1e-5 * new_w.abs().max())


def test_dead_inputs():
    X, W, _ = make_layer(d_in=32, d_out=16, n=512)
    X[:, [0, 7]] = 0  # features that never fire
    H = X.T @ X / X.shape[0]
    stats = LayerStats(X.shape[0], hessian=H)
    res, new_w, _ = prune_one("sparsegpt", W, stats, SparsitySpec(0.5))
    assert (new_w[:, [0, 7]] == 0).all() and torch.isfinite(new_w).all()
    res, new_w, _ = prune_one("admm", W, stats, SparsitySpec(0.5))
    assert torch.isfinite(new_w).all()
    assert not res.mask[:, [0, 7]].any()  # zero Wanda score: pruned first


def test_cubic_schedule_and_gradual_masks():
    vals = [cubic_sparsity(0.6, k, 15) for k in range(1, 16)]
    assert vals == sorted(vals) and vals[-1] == pytest.approx(0.6) and vals[0] > 0
    scores = torch.rand(16, 40, generator=torch.Generator().manual_seed(0))
    spec = SparsitySpec.parse("2:4")
    final = select_mask(scores, spec, spec.target)
    prev = torch.ones_like(final)
    for k in range(1, 6):
        s = cubic_sparsity(spec.target, k, 5)
        m = select_mask(scores, spec, s)
        assert 1 - m.float().mean().item() == pytest.approx(s, abs=1 / m.numel())
        assert m[final].all()  # only weights the final N:M mask rejects are pruned early
        prev = m
    assert torch.equal(prev, final) and is_valid_mask(final, spec)


@pytest.mark.parametrize("n,m,cols", [(2, 4, 40), (4, 8, 48), (1, 3, 30), (3, 8, 43)])
def test_gradual_nm_selection_equals_a_stable_sort(n, m, cols):
    """ADMM's early N:M steps prune the k lowest of the weights the final pattern rejects, ties in
    position order: the same as a stable sort of those weights, with ties (integer scores, the
    cumulative-sum path) and without (float scores, the one-selection path)."""
    gen = torch.Generator().manual_seed(n * 100 + cols)
    spec = SparsitySpec.parse(f"{n}:{m}")
    for scores in (torch.randint(0, 4, (12, cols), generator=gen).float(), torch.rand(12, cols, generator=gen)):
        rejected = ~nm_mask(scores, n, m).flatten()
        where = rejected.nonzero().squeeze(1)
        for s in (0.02, 0.1, 0.25, 0.99 * spec.target):
            k = min(n_to_prune(scores.numel(), s), where.numel())
            expected = torch.ones(scores.numel(), dtype=torch.bool)
            expected[where[torch.sort(scores.flatten()[where], stable=True).indices[:k]]] = False
            assert torch.equal(select_mask(scores, spec, s).flatten(), expected)


def test_early_two_of_four_steps_equal_a_stable_sort():
    """The network path of ADMM's early 2:4 steps (no gather of the rejected weights) prunes the
    same weights as a stable sort of the rejected ones; where a tie straddles the k-th value
    (every group a permutation of 0..3: no tie inside a group, ties everywhere across groups) it
    declines and the position-ordered path decides."""
    gen = torch.Generator().manual_seed(7)
    spec = SparsitySpec.parse("2:4")
    distinct = torch.rand(24, 64, generator=gen)
    permuted = torch.stack([torch.randperm(4, generator=gen) for _ in range(24 * 16)]).float().view(24, 64)
    for scores, network_decides in ((distinct, True), (permuted, False)):
        final = two_of_four(scores)
        assert final is not None
        rejected = ~final.flatten()
        where = rejected.nonzero().squeeze(1)
        for s in (0.03, 0.2, 0.45):
            k = n_to_prune(scores.numel(), s)
            expected = torch.ones(scores.numel(), dtype=torch.bool)
            expected[where[torch.sort(scores.flatten()[where], stable=True).indices[:k]]] = False
            assert (_early_two_of_four(scores, final, _pair_bounds(scores), k) is not None) == network_decides
            assert torch.equal(select_mask(scores, spec, s).flatten(), expected)


def test_two_of_four_network_equals_nm_mask():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(64, 96, generator=gen)
    assert torch.equal(two_of_four(scores), nm_mask(scores, 2, 4))
    ties = torch.randint(0, 3, (16, 32), generator=gen).float()
    assert two_of_four(ties) is None  # a tie at some group's threshold: nm_mask decides by position
    assert two_of_four(torch.rand(4, 10, generator=gen)) is None  # a trailing short group
    assert torch.equal(select_mask(ties, SparsitySpec.parse("2:4"), 0.5), nm_mask(ties, 2, 4))
