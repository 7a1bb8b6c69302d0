"""ProxSparse (methods/proxsparse.py): the 2:4 regulariser's proximal operator against a plain
per-group reference and a brute-force grid, its fixed points and equivariances, the frozen-weight
regulariser, the final top-2 rule, refusals, and a tiny-model run on the engine."""
import importlib
import itertools
import math
import shutil

import pytest
import torch

from prunebench.engines import masklearn
from prunebench import registry
from prunebench.run.conformance import prune_tiny
from prunebench.errors import UserError
from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix
from prunebench.sparsity.patterns import SparsitySpec, is_valid_mask, nm_mask

ps = importlib.import_module("prunebench.methods.proxsparse")


def _groups(n, seed=0, scale=1.0):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed)) * scale


# -- the proximal operator ------------------------------------------------------------------------

def _reference_prox(z, lam, sweeps):
    """One group in plain Python floats: the best of keep-2, and alternating minimisation over the
    3 and the 4 largest magnitudes (exactly `sweeps` sweeps, smallest coordinate first)."""
    order = sorted(range(4), key=lambda i: -abs(z[i]))
    a = [abs(z[i]) for i in order]

    def objective(w):
        reg = sum(w[i] * w[j] * w[k] for i, j, k in itertools.combinations(range(4), 3))
        return 0.5 * sum((wi - ai) ** 2 for wi, ai in zip(w, a)) + lam * reg

    candidates = [[a[0], a[1], 0.0, 0.0]]
    for support in (3, 4):
        w = [0.0] * 4
        for _ in range(sweeps):
            for i in reversed(range(support)):
                rest = [w[j] for j in range(support) if j != i]
                pairs = sum(x * y for x, y in itertools.combinations(rest, 2))
                w[i] = max(a[i] - lam * pairs, 0.0)
        candidates.append(w)
    best = min(candidates, key=objective)  # min keeps the first of equals: the sparser
    out = [0.0] * 4
    for slot, i in enumerate(order):
        out[i] = math.copysign(best[slot], z[i]) if best[slot] else 0.0
    return out


@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0, 4.0])
def test_prox_matches_a_plain_per_group_reference(lam):
    z = _groups(64, seed=1).double()  # float64 in, float64 out: the reference's precision
    ours = ps.prox_2to4(z, lam, iters=60, tol=0.0)  # tol 0: exactly 60 sweeps, as the reference
    ref = torch.tensor([_reference_prox(row.tolist(), lam, 60) for row in z], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("lam", [0.1, 0.5, 2.0])
def test_prox_is_at_least_as_good_as_a_brute_force_grid(lam):
    """The operator is a minimiser: no point of a 31^4 grid over [0, |z_i|] (where the minimiser
    lies) has a lower objective, and it never does worse than keeping z or its top 2."""
    z = _groups(24, seed=2)
    a = z.abs().double()
    ours = ps.prox_objective(ps.prox_2to4(z, lam).abs().double(), a, lam)
    t = torch.linspace(0, 1, 31, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t, t, t)  # [31^4, 4] fractions of |z_i|
    for g in range(z.shape[0]):
        points = grid * a[g]
        best = ps.prox_objective(points, a[g].expand_as(points), lam).min()
        assert ours[g] <= best + 1e-9, (g, float(ours[g]), float(best))
    top2 = a * nm_mask(a, 2, 4)
    assert torch.all(ours <= ps.prox_objective(a, a, lam) + 1e-12)
    assert torch.all(ours <= ps.prox_objective(top2, a, lam) + 1e-12)


def test_two_sparse_groups_are_fixed_points_and_lambda_zero_is_the_identity():
    z = _groups(200, seed=3)
    two = z * nm_mask(z.abs(), 2, 4)
    two[::7, 1:] = 0.0  # some groups with a single non-zero, one all zero
    two[5] = 0.0
    assert torch.equal(ps.prox_2to4(two, 3.0), two)
    assert torch.equal(ps.prox_2to4(z, 0.0), z)


def test_a_strong_regulariser_keeps_the_two_largest_unchanged():
    z = _groups(500, seed=4).view(25, 80)
    assert torch.equal(ps.prox_2to4(z, 1e4), z * nm_mask(z.abs(), 2, 4))


def test_prox_shrinks_keeps_signs_and_commutes_with_sign_flips_permutations_and_scale():
    z = _groups(300, seed=5)
    w = ps.prox_2to4(z, 0.7)
    assert torch.all(w.abs() <= z.abs()) and torch.all((w == 0) | (w.sign() == z.sign()))
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(ps.prox_2to4(z * flip, 0.7), w * flip)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(ps.prox_2to4(z[:, perm], 0.7), w[:, perm])
    # prox_lam(s z) = s prox_{lam s}(z): why the embedded preset rescales lambda_1 by the weight scale
    torch.testing.assert_close(ps.prox_2to4(10.0 * z, 0.07), 10.0 * w, atol=1e-5, rtol=1e-4)


def test_prox_keeps_shape_and_dtype_and_the_sweeps_stop_at_the_tolerance():
    w = _groups(48, seed=6, scale=0.2).view(12, 16).to(torch.bfloat16)
    out = ps.prox_2to4(w, 1.0)
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    a = ps.groups_of_four(_groups(64, seed=7)).abs().sort(dim=1, descending=True).values
    loose = ps.alternating_minimisation(a, 4, 0.5, 100, 1e-2)
    tight = ps.alternating_minimisation(a, 4, 0.5, 100, 0.0)
    assert not torch.equal(loose, tight) and torch.allclose(loose, tight, atol=1e-2)


needs_cpp = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                               reason="no C++ compiler here: the torch operator is the one in use")


@needs_cpp
def test_the_cpp_operator_is_used_where_a_compiler_is():
    assert ps._prox_extension() is not None


def _near_tie(out, z, lam):
    """Groups whose result's objective ties another candidate's within float32 rounding."""
    return (ps.prox_objective(out.double(), z.double(), lam) - ps.prox_objective(
        ps.prox_2to4(z.double(), lam).double(), z.double(), lam)).abs() < 1e-6


@pytest.mark.parametrize("lam,scale", [(0.05, 1.0), (0.5, 1.0), (4.0, 1.0), (0.025, 0.19)])
def test_cpp_operator_equals_the_torch_one_within_float_rounding(lam, scale):
    """Same sweeps, same stopping sweep: equal to the torch operator to float32 rounding, except
    in groups where two candidates' objectives tie within rounding (each side may pick another)."""
    z = _groups(40_000, seed=11, scale=scale)
    fused, plain = ps.prox_2to4(z, lam), ps.prox_2to4_torch(z, lam)
    close = ((fused - plain).abs() <= 1e-6 * scale + 1e-5 * plain.abs()).all(dim=1)
    assert torch.all(close | _near_tie(fused, z, lam) | _near_tie(plain, z, lam))
    assert (~close).sum().item() <= 5
    # exactly 60 sweeps (tol 0) against the plain per-group reference
    ref = torch.tensor([_reference_prox(row.tolist(), lam, 60) for row in z[:64]])
    torch.testing.assert_close(ps.prox_2to4(z[:64], lam, iters=60, tol=0.0), ref, atol=1e-6 * scale, rtol=1e-5)


@needs_cpp
def test_cpp_operator_stops_at_the_tolerance_and_is_the_same_for_any_thread_count():
    z = _groups(5000, seed=12)
    loose, tight = ps.prox_2to4(z, 0.5, tol=1e-1), ps.prox_2to4(z, 0.5, tol=0.0)
    assert not torch.equal(loose, tight) and torch.allclose(loose, tight, atol=1e-1)
    torch.testing.assert_close(loose, ps.prox_2to4_torch(z, 0.5, tol=1e-1), atol=1e-6, rtol=1e-5)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ps.prox_2to4(z, 0.5))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*outs)


# -- the frozen-weight regulariser and the final rule -----------------------------------------------

def test_frozen_deviation_is_the_authors_formula_with_sign_of_zero_plus_one():
    frozen = _groups(10, seed=8).view(5, 8)
    frozen[0, :3] = 0.0
    relaxed = (frozen + 0.1 * _groups(10, seed=9).view(5, 8)).requires_grad_()
    eps = 0.1
    sign = torch.where(frozen == 0, torch.ones_like(frozen), frozen.sign())
    authors = ((relaxed / (frozen + eps * sign)) * (relaxed - frozen)).norm() ** 2
    ours = ps.frozen_deviation(relaxed, frozen, eps)
    torch.testing.assert_close(ours, authors)
    ours.backward()
    assert relaxed.grad is not None and torch.isfinite(relaxed.grad).all()
    assert float(ps.frozen_deviation(frozen, frozen, eps)) == 0.0


def test_top2_mask_is_valid_2to4_and_breaks_ties_by_the_frozen_weights():
    frozen = _groups(64, seed=10).view(16, 16)
    spec = SparsitySpec.parse("2:4")
    assert torch.equal(ps.top2_mask(frozen, frozen), nm_mask(frozen.abs(), 2, 4).bool())
    relaxed = ps.prox_2to4(frozen, 2.0)
    relaxed[0, :4] = 0.0  # the operator emptied a group: the frozen weights decide
    mask = ps.top2_mask(relaxed, frozen)
    assert is_valid_mask(mask, spec) and int(mask.sum()) == frozen.numel() // 2
    assert torch.equal(mask[0, :4], nm_mask(frozen[:1, :4].abs(), 2, 4).bool()[0])


# -- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0.5", "0.6@layer", "4:8", "1:4", "hybrid:0.35/16"])
def test_anything_but_2to4_is_refused_in_one_line_before_a_model(text):
    pruner = registry.create("proxsparse", {"preset": "tiny"})
    with pytest.raises(UserError) as err:
        pruner.check_spec(SparsitySpec.parse(text))
    assert "2:4" in str(err.value) and "\n" not in str(err.value)
    pruner.check_spec(SparsitySpec.parse("2:4"))


@pytest.mark.parametrize("bad", [{"lambda1": -0.1}, {"lambda1": float("nan")}, {"lambda2": -1.0},
                                 {"lambda2": float("inf")}, {"epsilon": 0.0}, {"prox_iters": 0},
                                 {"prox_tol": -1.0}, {"lambda1": True}])
def test_bad_hyperparameters_are_refused_in_one_line(bad):
    with pytest.raises(UserError) as err:
        registry.create("proxsparse", dict({"preset": "tiny"}, **bad))
    assert "\n" not in str(err.value)


def test_presets_and_paper_differences():
    paper = registry.create("proxsparse", {}).config
    assert (paper.lambda1, paper.lambda2, paper.lr, paper.steps, paper.seqlen) == (0.25, 0.0, 1e-4, 400, 4096)
    assert paper.paper_differences() == {}
    full = registry.create("proxsparse", {"preset": "paper-llama31-full"}).config
    assert (full.lambda1, full.lambda2, full.epsilon, full.lr) == (0.85, 1.0, 0.1, 5e-5)
    embedded = registry.create("proxsparse", {"preset": "embedded"}).config
    maskllm = registry.create("maskllm", {"preset": "embedded"}).config
    assert (embedded.steps, embedded.batch_size, embedded.seqlen) == (maskllm.steps, maskllm.batch_size, maskllm.seqlen)
    diffs = embedded.paper_differences()
    assert {"steps", "seqlen", "lambda1", "lr"} <= set(diffs) and "lambda2" not in diffs


# -- on the engine ---------------------------------------------------------------------------------

def test_tiny_run_gives_valid_2to4_of_the_frozen_weights(calib_windows, monkeypatch):
    calls = []
    original = ps.ProxSparse.after_step

    def counting(self, logits, step, sched):
        calls.append(step)
        before = {n: t["W"].clone() for n, t in logits.items()}
        original(self, logits, step, sched)
        for n, t in logits.items():  # in place, and the result is the operator's
            torch.testing.assert_close(t["W"], ps.prox_2to4(before[n], self.config.lambda1))

    monkeypatch.setattr(ps.ProxSparse, "after_step", counting)
    dense = {n: weight_matrix(m).detach().clone() for n, m in all_prunable(load_tiny("llama", seed=0).model).items()}
    spec = SparsitySpec.parse("2:4")
    weights, report = prune_tiny("proxsparse", "llama", spec, calib_windows, config={"preset": "tiny"})
    assert calls == list(range(6))
    for name, w in weights.items():
        assert is_valid_mask(w != 0, spec), name
        kept = w != 0
        assert torch.equal(w[kept], dense[name][kept]), f"{name}: a kept weight changed"
        assert int(kept.sum()) >= w.numel() // 2 - int((dense[name] == 0).sum())
    stats = report.stats
    assert abs(stats["achieved_sparsity"] - 0.5) < 1e-9
    assert 0.0 <= stats["relaxed_groups_2sparse"] <= 1.0 and 0.5 < stats["magnitude_mask_agreement"] <= 1.0
    assert all(math.isfinite(v) and v >= 0 for v in stats["curves"]["deviation"])  # lambda2 > 0 in tiny
    assert "lr_schedule" in stats["authors_code_differences"]


def test_the_engine_hook_is_a_no_op_by_default():
    logits = {"layer": {"P": torch.randn(4, 8)}}
    before = logits["layer"]["P"].clone()
    masklearn.LearnedMaskPruner.after_step(None, logits, 0, {})
    assert torch.equal(logits["layer"]["P"], before)
