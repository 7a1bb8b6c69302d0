"""Thanos (methods/thanos.py): the block-wise multi-weight OBS solve against plain least squares,
exact sparsity, a better reconstruction than Wanda's mask, config checks, a tiny model."""
import pytest
import torch

from prunebench import registry
from prunebench.errors import UserError
from prunebench.contract import LayerStats, PruneContext
from prunebench.sparsity.patterns import SparsitySpec, is_valid_mask, n_to_prune

from prunebench.methods.sparsegpt import damped_inverse_cholesky
from prunebench.methods.thanos import obs_multipliers, outlier_rows, thanos_prune
from prunebench.methods.wanda import wanda_scores

import synthetic_layers
from synthetic_layers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(seed=0, n=1024, d_in=64, d_out=24, rank=6):
    """A smaller synthetic layer: (X, W, H = X^T X / n)."""
    X, W, stats = synthetic_layers.make_layer(seed, n, d_in, d_out, rank)
    return X, W, stats.hessian


def undamped(X, W, spec, **kw):
    """thanos_prune on H = X^T X / n exactly (no dampening), so least squares on X is its reference."""
    H = X.T @ X / X.shape[0]
    V, _, _ = damped_inverse_cholesky(H, 0.0)
    return thanos_prune(W, V, torch.diagonal(H).sqrt(), spec, **kw)


def reference(X, W, mask, blocksize):
    """Block by block, in float64: given the block's removed set Q (from `mask`), the weights of the
    not-yet-visited columns T become the least-squares w' minimising ||X_T (w_T - w')||^2 with
    w'_Q = 0, one row at a time; visited columns stay as they are."""
    X, W = X.double(), W.double().clone()
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        T = torch.arange(i1, cols)
        for r in range(W.shape[0]):
            removed = torch.zeros(cols, dtype=torch.bool)
            removed[i1:i1 + blocksize] = ~mask[r, i1:i1 + blocksize]
            free = T[~removed[T]]
            target = X[:, T] @ W[r, T]
            W[r, free] = torch.linalg.lstsq(X[:, free], target.unsqueeze(1)).solution.squeeze(1)
            W[r, removed] = 0.0
    return W


@pytest.mark.parametrize("blocksize", [64, 16, 24])
@pytest.mark.parametrize("spec", ["0.5@layer", "0.6@row", "2:4"])
def test_update_is_the_least_squares_solution_given_the_removed_set(blocksize, spec):
    g = torch.Generator().manual_seed(1)
    X, W = torch.randn(400, 64, generator=g), torch.randn(10, 64, generator=g)
    new_w, mask = undamped(X, W, SparsitySpec.parse(spec), blocksize=blocksize, v_blocksize=3)
    assert torch.equal(new_w == 0, ~mask) and (~mask).any()
    expected = reference(X, W, mask, blocksize).float()
    assert torch.allclose(new_w, expected, atol=2e-4 * float(expected.abs().max())), (new_w - expected).abs().max()


def test_obs_multipliers_solve_each_rows_system():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    C = A @ A.T + 12 * torch.eye(12, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    remove = torch.rand(5, 12, generator=g) < 0.4
    remove[0] = False  # a row with nothing to remove
    lam = obs_multipliers(w, C, remove, v_blocksize=2)
    for r in range(5):
        q = remove[r]
        assert torch.all(lam[r, ~q] == 0)
        if q.any():
            assert torch.allclose(lam[r, q], torch.linalg.solve(C[q][:, q], w[r, q]))
            assert torch.allclose((w[r] - lam[r] @ C)[q], torch.zeros(int(q.sum()), dtype=torch.float64))


@pytest.mark.parametrize("selection", ["remaining", "block"])
def test_exact_sparsity_unstructured(selection):
    X, W, _ = make_layer(d_in=101, d_out=13)
    for target in (0.5, 0.6, 0.37):
        _, mask = undamped(X, W, SparsitySpec(target, scope="layer"), blocksize=32, selection=selection)
        assert int((~mask).sum()) == n_to_prune(mask.numel(), target)
        _, mask = undamped(X, W, SparsitySpec(target, scope="row"), blocksize=32, selection=selection)
        assert torch.all((~mask).sum(dim=1) == n_to_prune(101, target))
        # stacked layers sharing the Hessian (q, k, v): each one exact over its own rows
        groups = [(0, 4), (4, 13)]
        _, mask = undamped(X, W, SparsitySpec(target, scope="layer"), blocksize=32, selection=selection,
                           row_groups=groups)
        for a, b in groups:
            assert int((~mask[a:b]).sum()) == n_to_prune((b - a) * 101, target)


@pytest.mark.parametrize("nm,blocksize", [("2:4", 128), ("2:4", 10), ("4:8", 32), ("1:3", 16)])
def test_exact_sparsity_nm(nm, blocksize):
    X, W, _ = make_layer(d_in=96)
    spec = SparsitySpec.parse(nm)
    new_w, mask = undamped(X, W, spec, blocksize=blocksize)
    assert is_valid_mask(mask, spec)
    assert torch.all(mask.reshape(W.shape[0], -1, spec.m).sum(-1) == spec.n)
    assert torch.equal(new_w == 0, ~mask)


def test_the_row_batches_do_not_change_the_result():
    X, W, _ = make_layer()
    spec = SparsitySpec(0.5, scope="layer")
    base, mask = undamped(X, W, spec, blocksize=16, v_blocksize=64)
    for v in (1, 5):
        other, other_mask = undamped(X, W, spec, blocksize=16, v_blocksize=v)
        assert torch.equal(mask, other_mask) and torch.allclose(base, other, atol=1e-4)


def prune(W, H, spec, **config):
    pruner = registry.create("thanos", config)
    spec = spec.resolved(pruner.default_scope)
    stats = LayerStats(n_tokens=1, hessian=H)
    res = pruner.prune_linear(W.clone(), stats, spec, PruneContext(sparsity=spec, registry=registry))
    return res.weight * res.mask, res.mask


@pytest.mark.parametrize("spec", ["0.5", "0.6", "2:4"])
def test_reconstruction_beats_wandas_mask_without_update(spec):
    X, W, H = make_layer(seed=3)
    spec = SparsitySpec.parse(spec)
    from prunebench.sparsity.patterns import mask_from_scores

    err = lambda W_hat: float(((X @ (W - W_hat).T) ** 2).sum())  # noqa: E731
    thanos_w, _ = prune(W, H, spec)
    wanda_w = W * mask_from_scores(wanda_scores(W, torch.diagonal(H).sqrt()), spec.resolved("row"))
    assert err(thanos_w) < 0.8 * err(wanda_w), (err(thanos_w), err(wanda_w))


@pytest.mark.parametrize("bad", [{"blocksize": 0}, {"v_blocksize": 0}, {"percdamp": -0.1},
                                 {"selection": "global"}, {"outlier_rows": 0.1}, {"max_damp_retries": -1},
                                 {"blocksize": "128"}, {"nonsense": 1}])
def test_bad_config_is_refused(bad):
    with pytest.raises(UserError) as info:
        registry.create("thanos", bad)
    assert "\n" not in str(info.value)


def test_the_authors_nm_outlier_rows():
    """Their N:M path leaves int(p * rows) + 1 rows dense (not a method option: the mask is not
    N:M); the pure function picks the rows with the largest sum_j W_ij^2 x_j^2."""
    X, W, H = make_layer(d_out=30)
    dense = outlier_rows(W, torch.diagonal(H), 0.1)
    assert int(dense.sum()) == int(0.1 * 30) + 1
    metric = (W.pow(2) * torch.diagonal(H)).sum(dim=1)
    assert metric[dense].min() >= metric[~dense].max()


@pytest.mark.parametrize("spec", ["0.5", "0.6@row", "2:4"])
def test_tiny_model(spec, calib_windows):
    from prunebench.run.conformance import prune_tiny

    spec = SparsitySpec.parse(spec)
    weights, report = prune_tiny("thanos", "llama", spec, calib_windows)
    assert report.updates_weights and report.stats["scope"] == spec.resolved("layer").scope
    for name, w in weights.items():
        assert torch.isfinite(w).all(), name
        if spec.pattern == "nm":
            assert is_valid_mask(w != 0, spec), name
        elif spec.scope == "row":
            assert torch.all((w == 0).sum(dim=1) == n_to_prune(w.shape[1], spec.target)), name
        else:
            assert int((w == 0).sum()) == n_to_prune(w.numel(), spec.target), name
