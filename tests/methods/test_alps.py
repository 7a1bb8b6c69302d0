"""ALPS (methods/alps.py): its pure parts on synthetic tensors, then the registered method.

Small matrices only: every test runs in well under a second on one thread.
"""
import pytest
import torch

from prunebench import registry
from prunebench.errors import UserError
from prunebench.contract import PruneContext
from prunebench.sparsity.patterns import SparsitySpec, is_valid_mask, mask_from_scores

from prunebench.methods.admm import normalise_inputs
from prunebench.methods.alps import (RhoSchedule, alps_admm, alps_prune, eigen_factor, masked_pcg, ridge_inverse,
                                     ridge_solve)
from prunebench.methods.sparsegpt import CholeskyError

from synthetic_layers import make_layer, one_thread, prune_one, recon_error  # noqa: F401 (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def masked_optimum(A, W, mask):
    """Per row, the exact masked least-squares optimum: A[S, S] x_S = (A w)[S], x = 0 off S."""
    A, W = A.double(), W.double()
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        S = mask[r].nonzero().squeeze(1)
        out[r, S] = torch.linalg.solve(A[S][:, S], (A @ W[r])[S])
    return out


# --- the eigendecomposition solve -------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.02, 0.1, 1.0, 37.0, 1e6])
def test_eigen_solve_equals_a_direct_solve(rho):
    _, W, stats = make_layer(seed=1, d_in=48, d_out=16)
    Hn, Wn, _ = normalise_inputs(stats.hessian + 0.01 * torch.diagonal(stats.hessian).mean() * torch.eye(48), W)
    Q, L = eigen_factor(Hn)
    A = Hn.double() + rho * torch.eye(48, dtype=torch.float64)
    rhs = (Wn @ Hn).double()
    direct = torch.linalg.solve(A, rhs.T).T  # X A = rhs, A symmetric
    for got in (rhs.float() @ ridge_inverse(Q, L, rho), ridge_solve(Q, L, rhs.float(), rho)):
        rel = float((got.double() - direct).norm() / direct.norm())
        assert rel < 1e-5, (rho, rel)
    inv = ridge_inverse(Q, L, rho).double()
    assert float((inv @ A - torch.eye(48, dtype=torch.float64)).abs().max()) < 1e-4


# --- CG on a fixed support ------------------------------------------------------------------

def test_pcg_reaches_the_masked_least_squares_optimum():
    _, W, stats = make_layer(seed=3, n=1024, d_in=32, d_out=8, rank=2)
    A = stats.hessian + 0.01 * torch.diagonal(stats.hessian).mean() * torch.eye(32)  # unnormalised: Jacobi matters
    mask = mask_from_scores(W.abs() * stats.input_norm, SparsitySpec(0.6, scope="row"))
    ref = masked_optimum(A, W, mask)
    X, iters = masked_pcg(A, W @ A, mask, W, rtol=1e-9, max_iterations=500)
    assert iters < 500  # converged by its own test, not by the cap
    assert (X[~mask] == 0).all()
    rel = float(((X.double() - ref).norm(dim=1) / ref.norm(dim=1)).max())
    assert rel < 1e-3, rel
    # From zero and from the dense weights alike; a row's support size bounds CG's iterations
    # in exact arithmetic, so 2x that is plenty in float32.
    X0, _ = masked_pcg(A, W @ A, mask, None, rtol=0.0, max_iterations=2 * int(mask.sum(1).max()))
    assert float(((X0.double() - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-3


def test_pcg_default_budget_on_normalised_inputs_and_the_authors_stopping_test():
    # On the unit-diagonal problem ALPS actually solves, the default 10 iterations get close.
    _, W, stats = make_layer(seed=4, n=1024, d_in=64, d_out=16, rank=4)
    Hd = stats.hessian + 0.01 * torch.diagonal(stats.hessian).mean() * torch.eye(64)
    Hn, Wn, _ = normalise_inputs(Hd, W)
    mask = mask_from_scores(Wn.abs(), SparsitySpec(0.7, scope="layer"))
    ref = masked_optimum(Hn, Wn, mask)

    def objective(Bm):
        D = Bm.double() - Wn.double()
        return float(((D @ Hn.double()) * D).sum())

    start = torch.where(mask, Wn, torch.zeros_like(Wn))
    X, iters = masked_pcg(Hn, Wn @ Hn, mask, start)
    assert iters <= 10
    assert objective(X) <= objective(ref) * 1.01 and objective(X) < 0.5 * objective(start)
    # The authors' test compares the unmasked residual, which does not vanish at the optimum:
    # it never stops before the cap.
    _, authors_iters = masked_pcg(Hn, Wn @ Hn, mask, start, rtol=1e-4, max_iterations=25, authors_stop=True)
    assert authors_iters == 25


# --- the rho schedule -------------------------------------------------------------------------

def test_rho_schedule_follows_the_stated_rule():
    kept = 100_000  # s = change / kept
    s = RhoSchedule(rho=0.1)
    script = [  # (iteration, change, expected factor, expected stop)
        (3, 20_000, 1.3, False),  # s = 0.2 > 0.1
        (6, 10_001, 1.3, False),  # just above 0.1
        (9, 10_000, 1.2, False),  # s = 0.1 exactly: not > 0.1
        (12, 501, 1.2, False),  # just above 0.005
        (15, 500, 1.1, False),  # s = 0.005 exactly
        (18, 0, 1.1, False),  # no change before iteration 30: no stop under the stated rule
        (30, 0, 1.1, False),  # 30 iterations done is not "after 30"
        (33, 30, 1.1, False),  # s = 3e-4 exactly: not below
        (36, 29, 1.1, True),  # after 30 and s < 3e-4: stop
    ]
    rho = 0.1
    for iteration, change, factor, stop in script:
        restart, stopped = s.check(iteration, change, kept)
        rho *= factor
        assert not restart
        assert stopped == stop, (iteration, change)
        assert s.rho == pytest.approx(rho, rel=1e-12), (iteration, change)
    capped = RhoSchedule(rho=9e5)
    capped.check(3, 50_000, kept)
    assert capped.rho == 1e6
    capped.check(6, 50_000, kept)
    assert capped.rho == 1e6


def test_rho_schedule_authors_branches():
    kept = 1000
    s = RhoSchedule(rho=0.1, authors_rho_rule=True)
    assert s.check(3, 3, kept) == (True, False) and s.rho == pytest.approx(0.02)  # small change, never grown: restart
    assert s.check(6, 0, kept) == (False, False) and s.rho == pytest.approx(0.004)  # none at all: shrink only
    assert s.check(9, 200, kept) == (False, False) and s.rho == pytest.approx(0.0052)  # grows
    assert s.check(12, 3, kept) == (False, False) and s.rho == pytest.approx(0.00572)  # now the slow factor
    assert s.check(15, 0, kept) == (False, True) and s.rho == pytest.approx(0.00572)  # no change once grown: stop


def test_admm_loop_applies_the_schedule_every_third_iteration():
    X, W, stats = make_layer(seed=2, d_in=64, d_out=32)
    Hd = stats.hessian + 0.01 * torch.diagonal(stats.hessian).mean() * torch.eye(64)
    Hn, Wn, _ = normalise_inputs(Hd, W)
    Q, L = eigen_factor(Hn)
    spec = SparsitySpec(0.7, scope="layer")
    B, mask, info = alps_admm(Q, L, Wn, Wn @ Hn, spec)
    history = info["history"]
    assert [it for it, _, _ in history] == list(range(3, info["iterations"] + 1, 3))
    replay = RhoSchedule(rho=0.1)
    kept = int(mask.sum())
    for it, change, rho in history:
        _, stop = replay.check(it, change, kept)
        assert replay.rho == pytest.approx(rho)
    assert stop and info["iterations"] > 30
    assert (B[~mask] == 0).all() and int((~mask).sum()) == int(0.7 * W.numel())
    capped = alps_admm(Q, L, Wn, Wn @ Hn, spec, max_iterations=7)[2]
    assert capped["iterations"] == 7 and len(capped["history"]) == 2


# --- the registered method --------------------------------------------------------------------

@pytest.mark.parametrize("scope", [None, "layer", "row"])
def test_unstructured_sparsity_is_exact(scope):
    _, W, stats = make_layer(d_in=96, d_out=40)
    res, new_w, spec = prune_one("alps", W, stats, SparsitySpec(0.6, scope=scope))
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape and is_valid_mask(res.mask, spec)
    if spec.scope == "row":
        assert ((~res.mask).sum(dim=1) == int(0.6 * W.shape[1])).all()
    else:
        assert spec.scope == "layer" and int((~res.mask).sum()) == int(0.6 * W.numel())
    assert (new_w[~res.mask] == 0).all() and (new_w[res.mask] != 0).all() and torch.isfinite(new_w).all()
    assert new_w.dtype == torch.float32 and not torch.equal(new_w[res.mask], W[res.mask])  # kept weights updated


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 3)])
def test_nm_masks_are_exact(nm):
    _, W, stats = make_layer(d_in=128, d_out=24)  # 128 is not a multiple of 3: a short tail group
    spec = SparsitySpec.parse(f"{nm[0]}:{nm[1]}")
    res, new_w, _ = prune_one("alps", W, stats, spec)
    n, m = nm
    assert is_valid_mask(res.mask, spec)
    full = W.shape[1] - W.shape[1] % m
    assert (res.mask[:, :full].reshape(W.shape[0], -1, m).sum(-1) == n).all()
    assert (new_w[~res.mask] == 0).all() and torch.isfinite(new_w).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_reconstruction_beats_masks_without_update_and_matches_admm_at_70(seed):
    X, W, stats = make_layer(seed=seed)
    spec = SparsitySpec(0.7)
    errs = {name: recon_error(X, W, prune_one(name, W, stats, spec)[1]) for name in ("alps", "admm", "wanda", "magnitude")}
    assert errs["alps"] < errs["wanda"] < errs["magnitude"], errs
    assert errs["alps"] <= errs["admm"], errs


def test_same_result_twice_and_shared_input_group_equals_one_at_a_time():
    _, W, stats = make_layer(seed=5, d_in=64, d_out=48)
    spec = SparsitySpec(0.6, scope="layer")
    pruner = registry.create("alps")
    ctx = PruneContext(sparsity=spec, registry=registry)
    a, b = W[:16].clone(), W[16:].clone()
    group = pruner.prune_group({"q": a.clone(), "k": b.clone()}, stats, spec, ctx)
    for name, w in (("q", a), ("k", b)):
        alone = pruner.prune_linear(w.clone(), stats, spec, ctx)
        again = pruner.prune_linear(w.clone(), stats, spec, ctx)
        assert torch.equal(alone.mask, again.mask) and torch.equal(alone.weight, again.weight)
        assert torch.equal(group[name].mask, alone.mask)  # each selected over its own rows
        assert torch.allclose(group[name].weight, alone.weight, rtol=1e-5, atol=1e-6)


def test_dead_inputs_and_bad_hessians():
    _, W, stats = make_layer(seed=6, d_in=32, d_out=8)
    H = stats.hessian.clone()
    H[3, :] = 0
    H[:, 3] = 0
    new_w, mask, _ = alps_prune(H, W, SparsitySpec(0.5, scope="layer"))
    assert torch.isfinite(new_w).all() and int((~mask).sum()) == int(0.5 * W.numel())
    H[0, 0] = float("nan")
    with pytest.raises(CholeskyError):
        alps_prune(H, W, SparsitySpec(0.5, scope="layer"))


@pytest.mark.parametrize("bad", [{"rho": 0.0}, {"rho": 2e6}, {"percdamp": -0.1}, {"max_iterations": 0},
                                 {"update_every": 0}, {"min_iterations": -1}, {"stop_change": -1e-3},
                                 {"cg_iterations": -1}, {"cg_rtol": -1.0}, {"rho_max": 0.05}, {"nope": 1}])
def test_bad_config_is_refused(bad):
    with pytest.raises(UserError):
        registry.create("alps", bad)


def test_registered_with_the_papers_defaults():
    cls = registry.get("alps")
    assert cls.display == "ALPS" and cls.default_scope == "layer"
    assert cls.capabilities.patterns == ("unstructured", "nm") and cls.capabilities.statistics == "hessian"
    c = registry.create("alps").config
    assert (c.percdamp, c.rho, c.max_iterations, c.update_every, c.min_iterations, c.stop_change, c.rho_max,
            c.cg_iterations, c.cg_rtol) == (0.01, 0.1, 300, 3, 30, 3e-4, 1e6, 10, 1e-4)
    assert not c.authors_rho_rule and not c.authors_cg_stop


@pytest.mark.parametrize("text", ["0.5", "2:4"])
def test_tiny_model(text, calib_windows):
    from prunebench.run.conformance import prune_tiny

    spec = SparsitySpec.parse(text)
    from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix

    dense = {n: weight_matrix(m).detach().clone() for n, m in all_prunable(load_tiny("llama", seed=0).model).items()}
    weights, report = prune_tiny("alps", "llama", spec, calib_windows)
    assert report.updates_weights
    for name, w in weights.items():
        assert torch.isfinite(w).all()
        if spec.pattern == "nm":
            assert is_valid_mask(w != 0, spec)
        else:
            assert int((w == 0).sum()) == int(0.5 * w.numel()), name  # scope "layer": exact per matrix
        kept = w != 0
        assert not torch.equal(w[kept], dense[name][kept])  # the kept weights were updated
