"""MaskLLM (methods/maskllm.py) and PATCH (methods/patch.py), the learned N:M and dense-or-2:4
methods: the pattern table, the sampled pattern mask and PATCH's fused masked weight against
plain formulas (values and gradients), the priors, the hybrid tile spec and its checker, and
PATCH's tiles on a tiny model.  The engine they share: engines/test_masklearn.py."""
import importlib

import pytest
import torch

from prunebench import registry
from prunebench.contract import PruneContext
from prunebench.engines import fused_masks
from prunebench.errors import UserError
from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix
from prunebench.sparsity.checks import OutputCheckError, check_output
from prunebench.sparsity.patterns import (
    HYBRID_DENSE_MAX_ZEROS, SparsitySpec, hybrid_tiles, is_valid_mask, nm_mask
)

maskllm = importlib.import_module("prunebench.methods.maskllm")
patch = importlib.import_module("prunebench.methods.patch")


def _ctx(loaded, calib, target, **kw):
    return PruneContext(sparsity=SparsitySpec.parse(target), calibration=calib, seed=kw.pop("seed", 0), progress=False,
                        registry=registry, tokenizer=loaded.tokenizer, calibration_dataset="lee", **kw)


# -- MaskLLM ---------------------------------------------------------------------------------------

def test_nm_patterns_table():
    table = maskllm.nm_patterns(2, 4)
    assert table.shape == (6, 4) and torch.equal(table.sum(1), torch.full((6,), 2.0))
    assert len({tuple(r.tolist()) for r in table}) == 6
    assert maskllm.nm_patterns(1, 4).shape == (4, 4)


def test_sampled_pattern_mask_matches_the_reference_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    table = maskllm.nm_patterns(2, 4)
    weight = torch.randn(6, 8, generator=gen)
    logits = (torch.randn(12, 6, generator=gen) * 0.05).requires_grad_(True)
    seed, kappa, tau = 77, 30.0, 0.7
    fused, sq = maskllm.pattern_masked_weight(logits, weight, table, seed, kappa, tau)
    noise = fused_masks.counter_gumbel(logits.shape, seed)  # the counter noise of the layer's seed
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = maskllm.soft_pattern_mask(ref_logits, noise, table, kappa, tau, weight.shape) * weight
    torch.testing.assert_close(fused, ref)
    g = torch.randn(6, 8, generator=gen)
    ((fused * g).sum() + 0.3 * sq).backward()
    ((ref * g).sum() + 0.3 * ref.square().sum()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["joint", "tile"])
def test_patch_fused_masked_weight_matches_its_soft_mask(mode):
    """PATCH's masked weight (joint mode: the fused pass) against its soft mask as torch ops, values
    and gradients into both logit tensors, on a shape with partial edge tiles."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(40, 72, generator=gen)
    pruner = registry.create("patch", {"preset": "tiny", "mode": mode})
    pruner.begin({"layer": torch.nn.Linear(72, 40, bias=False).requires_grad_(False)}, SparsitySpec.parse("hybrid:0.35/16"))
    second = {"G": torch.randn(40 * 72 // 4, 6, generator=gen) * 0.05} if mode == "joint" else \
        {"S": maskllm.argmax_pattern_mask(torch.randn(40 * 72 // 4, 6, generator=gen), maskllm.nm_patterns(2, 4),
                                          (40, 72)).float()}
    logits = {"T": torch.randn(3, 5, generator=gen) * 0.05, **second}
    sched = pruner.schedule(2)
    grads = []
    for fused in (True, False):
        ps = {k: v.clone().requires_grad_(k != "S") for k, v in logits.items()}
        if fused:
            masked, stats = pruner.masked_weight("layer", 0, ps, weight, 123, sched)
            mask_sum, norm = stats["mask_sum"], stats["masked_norm"]
        else:
            mask = pruner.soft_mask(ps, weight, 123, sched)
            masked, mask_sum, norm = mask * weight, mask.sum(), (mask * weight).norm()
        (masked.square().sum() + 2.0 * mask_sum - 3.0 * norm).backward()
        grads.append((masked.detach(), {k: v.grad for k, v in ps.items() if k != "S"}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for key in grads[0][1]:  # kappa / tau ~ 100 scales the float32 rounding of y (dy - <y, dy>)
        ref = grads[1][1][key]
        torch.testing.assert_close(grads[0][1][key], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_prior_favours_the_prior_pattern_and_argmax_is_exact_nm():
    table = maskllm.nm_patterns(2, 4)
    scores = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    keep = nm_mask(scores, 2, 4)
    logits = maskllm.pattern_prior_logits(keep, table, 0.01, 3.0, torch.Generator().manual_seed(2))
    final = maskllm.argmax_pattern_mask(logits, table, keep.shape)
    assert is_valid_mask(final, SparsitySpec.parse("2:4")) and int(final.sum()) == keep.numel() // 2
    # a 3-sigma head start over each pattern sharing one position fewer: the untrained argmax is the
    # prior's pattern unless N(0, 2 sigma^2) noise beats 3 sigma (p ~ 1.7% per rival, 4 rivals)
    agree = (final == keep).float().mean().item()
    assert 0.9 < agree < 1.0


def test_maskllm_refuses_what_it_cannot_learn(calib_windows):
    for text, hint in (("4:8", "patterns per group"), ("0.5", "N:M masks")):
        with pytest.raises(UserError, match=hint):
            registry.create("maskllm", {"preset": "tiny"}).check_spec(SparsitySpec.parse(text))
    registry.create("maskllm", {"preset": "tiny"}).check_spec(SparsitySpec.parse("1:4"))


# -- the hybrid spec and its checker -------------------------------------------------------------------

def test_hybrid_spec_text_forms_and_limits():
    spec = SparsitySpec.parse("hybrid:0.35/64")
    assert (spec.pattern, spec.target, spec.tile, spec.n, spec.m) == ("hybrid", 0.35, 64, 2, 4)
    assert spec.label == "hybrid:0.35/64" and SparsitySpec.parse(spec.label) == spec
    assert SparsitySpec.parse("hybrid:45%").tile == 128 and SparsitySpec.parse("hybrid:45%").target == 0.45
    assert "tile" not in SparsitySpec.parse("0.5").to_dict()  # other specs' identity is unchanged
    for bad, message in (("hybrid:0.6", "at most 50%"), ("hybrid:0.3/6", "multiple of 4"), ("hybrid:x", "hybrid:")):
        with pytest.raises(UserError, match=message):
            SparsitySpec.parse(bad)


def _hybrid_weight(kinds, tile=8, rows=2, cols=2):
    """A weight of rows x cols tiles; kinds[i]: 'dense', '2:4' or 'unstructured' (50% random)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows * tile, cols * tile, generator=gen) + 3.0
    for i, kind in enumerate(kinds):
        r, c = divmod(i, cols)
        block = w[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        if kind == "2:4":
            block.mul_(nm_mask(torch.randn(tile, tile, generator=gen), 2, 4))
        elif kind == "unstructured":
            block.mul_(torch.rand(tile, tile, generator=gen) > 0.5)
    return w


def test_hybrid_checker_accepts_dense_and_2to4_tiles_and_names_a_bad_one():
    spec = SparsitySpec.parse("hybrid:0.25/8")
    good = _hybrid_weight(["dense", "2:4", "2:4", "dense"])
    tiles = hybrid_tiles(good != 0, 8)
    assert tiles["counts"] == {"nm": 2, "dense": 2, "invalid": 0}
    check_output([("w", good)], spec, "global")
    bad = _hybrid_weight(["dense", "2:4", "unstructured", "dense"])
    with pytest.raises(OutputCheckError, match="neither dense nor 2:4.*tile row 1, column 0"):
        check_output([("w", bad)], spec, "global")
    # the right pattern at the wrong amount fails on the budget
    with pytest.raises(OutputCheckError, match="achieved sparsity"):
        check_output([("w", good)], SparsitySpec.parse("hybrid:0.45/8"), "global")
    # a dense tile may carry a few exact zeros of the dense model
    few = good.clone()
    few[0, :int(HYBRID_DENSE_MAX_ZEROS * 64) - 1] = 0
    assert hybrid_tiles(few != 0, 8)["counts"]["invalid"] == 0


# -- PATCH ------------------------------------------------------------------------------------------

def test_tile_prior_and_exact_tile_count():
    keep = torch.zeros(32, 32, dtype=torch.bool)
    keep[:8, :8] = True  # two fully kept tiles of the 16 (8 x 8)
    keep[16:24, 16:24] = True
    prior = patch.tile_prior(keep, 8, density=0.5 + 2 / 16 / 2)  # room for 2 dense tiles
    assert int((prior > 0).sum()) == 2 and prior[0, 0] > 0 and prior[2, 2] > 0
    sizes = {"a": torch.full((4, 4), 64.0), "b": torch.full((2, 2), 16.0)}
    logits = {"a": torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(2, 2)}
    dense = patch.exact_dense_tiles(logits, sizes, 0.25)
    in_24 = sum(float(sizes[n][~dense[n]].sum()) for n in dense)
    assert in_24 / 2 / (16 * 64 + 4 * 16) == pytest.approx(0.25, abs=32 / (16 * 64 + 4 * 16))


@pytest.mark.parametrize("mode", ["joint", "tile"])
def test_patch_meets_its_effective_sparsity_with_valid_tiles(calib_windows, mode):
    spec = SparsitySpec.parse("hybrid:0.35/16")
    loaded = load_tiny("llama")
    report = registry.create("patch", {"preset": "tiny", "mode": mode}).prune(loaded.model,
                                                                            _ctx(loaded, calib_windows, spec.label))
    weights = [(n, weight_matrix(m)) for n, m in all_prunable(loaded.model).items()]
    check_output(weights, spec, report.stats["scope"])
    assert report.stats["dense_tiles"] < report.stats["tiles"]
    # the recorded tile counts are those of the pruned weights
    tiles = [hybrid_tiles(w != 0, 16) for _, w in weights]
    assert report.stats["tiles"] == sum(t["dense"].numel() for t in tiles)
    assert report.stats["dense_tiles"] == sum(int(t["dense"].sum()) for t in tiles)
    if mode == "tile":  # the frozen 2:4 masks are SparseGPT's, inside every 2:4 tile
        prior = load_tiny("llama")
        registry.create("sparsegpt", {"percdamp": 0.01}).prune(prior.model, _ctx(prior, calib_windows, "2:4"))
        for (name, w), m in zip(weights, all_prunable(prior.model).values()):
            tiles = hybrid_tiles(w != 0, 16)
            two_four = torch.repeat_interleave(torch.repeat_interleave(tiles["nm"] & ~tiles["dense"], 16, 0), 16, 1)
            two_four = two_four[:w.shape[0], :w.shape[1]]
            assert torch.equal((w != 0)[two_four], (weight_matrix(m) != 0)[two_four]), name


def test_patch_group_init_rules():
    table = maskllm.nm_patterns(2, 4)
    keep = nm_mask(torch.randn(16, 32, generator=torch.Generator().manual_seed(1)), 2, 4)
    overlap = maskllm.prior_overlap(keep, table)
    # the authors' rule: no noise, the prior pattern leads every rival by its missing overlap x 3 std
    replaced = patch.group_prior_logits(keep, table, 0.014, 3.0, "replace", torch.Generator().manual_seed(2))
    torch.testing.assert_close(replaced, (overlap - 1.0) * 0.042)
    assert torch.equal(maskllm.argmax_pattern_mask(replaced, table, keep.shape), keep)
    # MaskLLM's rule: the same draw as its own init, so groups differ and a few near-ties flip
    added = patch.group_prior_logits(keep, table, 0.014, 3.0, "add", torch.Generator().manual_seed(2))
    torch.testing.assert_close(added, maskllm.pattern_prior_logits(keep, table, 0.014, 3.0,
                                                                   torch.Generator().manual_seed(2)))
    assert 0.9 < (maskllm.argmax_pattern_mask(added, table, keep.shape) == keep).float().mean().item() < 1.0
    with pytest.raises(UserError, match="group_init"):
        registry.create("patch", {"preset": "tiny", "group_init": "mix"})
