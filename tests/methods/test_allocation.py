"""Per-block sparsity allocation (OWL, AlphaPruning) in the layer-wise engine, the counting
convention, and SparseGPT's shared-Hessian path."""
import json

import pytest
import torch

from prunebench.engines import allocation
from prunebench import registry
from prunebench.sparsity.checks import OutputCheckError, check_output
from prunebench.cli.command import main
from prunebench.run.grid import grid_from_dict
from prunebench.errors import UserError
from prunebench.methods.alphapruning import alpha_peak, alpha_sparsities, hill_alpha, spectrum
from prunebench.methods.owl import outlier_ratio, owl_nm_pruned, owl_sparsities
from prunebench.methods.sparsegpt import damped_inverse_cholesky, prepare_hessian, sparsegpt_prune
from prunebench.modeling.models import all_prunable, load_model, weight_matrix
from prunebench.contract import LayerStats, PruneContext
from prunebench.sparsity.patterns import SparsitySpec, mask_from_scores, n_to_prune


# --- the counting convention ------------------------------------------------------------------


def assert_group_prunes_each_as_alone(pruner, weights, stats, ctx, *, specs, atol):
    """A linear pruned with its group (shared statistics) gets the mask and weights it gets alone."""
    for spec in specs:
        together = pruner.prune_group({k: w.clone() for k, w in weights.items()}, stats, spec, ctx)
        for name, w in weights.items():
            alone = pruner.prune_linear(w.clone(), stats, spec, ctx)
            assert torch.equal(together[name].mask, alone.mask), (name, spec)
            assert torch.allclose(together[name].weight, alone.weight, atol=atol), (name, spec)

def test_counting_is_the_reference_truncation():
    assert n_to_prune(576, 0.6) == 345  # int(0.6 * 576), the reference code's count
    assert n_to_prune(1536, 0.7) == int(1536 * 0.7)
    scores = torch.rand(4, 576)
    assert ((~mask_from_scores(scores, SparsitySpec(0.6, scope="row"))).sum(1) == 345).all()
    assert int((~mask_from_scores(scores, SparsitySpec(0.6, scope="layer"))).sum()) == int(0.6 * 4 * 576)


def test_every_method_counts_the_same_way():
    """Wanda, magnitude, SparseGPT and ADMM prune int(0.6 * n) of a 576-wide layer."""
    torch.manual_seed(0)
    W = torch.randn(8, 576)
    X = torch.randn(2000, 576)
    stats = LayerStats(n_tokens=2000, input_sq_mean=(X * X).mean(0), hessian=X.t() @ X / 2000)
    ctx = PruneContext(sparsity=SparsitySpec(0.6))
    for name, scope, expected in (("wanda", "row", 8 * 345), ("magnitude", "layer", int(0.6 * 8 * 576)),
                                  ("sparsegpt", "layer", int(0.6 * 8 * 576)), ("sparsegpt", "row", 8 * 345),
                                  ("admm", "layer", int(0.6 * 8 * 576))):
        res = registry.create(name).prune_linear(W.clone(), stats, SparsitySpec(0.6, scope=scope), ctx)
        assert int((~res.mask).sum()) == expected, (name, scope)


# --- SparseGPT: faithful, and the shared-Hessian path is exact --------------------------------

def _reference_sparsegpt(W, U, target, blocksize):
    """The reference algorithm written out plainly: per block of columns, the k = int(target *
    block size) lowest saliencies w^2 / d^2 are pruned (chosen when the block is reached, from
    the weights as updated so far), then every column's error is pushed onto the later columns
    of the block and, once per block, onto the rest of the matrix."""
    W = W.clone()
    rows, cols = W.shape
    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        d = torch.diagonal(U[i1:i2, i1:i2])
        sal = W[:, i1:i2] ** 2 / d ** 2
        k = int(target * sal.numel())
        prune = torch.zeros(sal.numel(), dtype=torch.bool)
        prune[torch.sort(sal.flatten(), stable=True).indices[:k]] = True
        prune = prune.view_as(sal)
        errs = torch.zeros(rows, i2 - i1)
        for i in range(i2 - i1):
            c = i1 + i
            w = W[:, c].clone()
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W[:, c:i2] -= err[:, None] * U[c, c:i2][None, :]
            W[:, c] = q
            errs[:, i] = err
        W[:, i2:] -= errs @ U[i1:i2, i2:]
        mask[:, i1:i2] = ~prune
    return W, mask


def _hessian(n_in, n_tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, n_in, generator=g) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g))
    return X.t() @ X / n_tokens


@pytest.mark.parametrize("target", [0.5, 0.6])
def test_sparsegpt_matches_the_reference_algorithm(target):
    torch.manual_seed(1)
    W = torch.randn(10, 40)
    H, W, _ = prepare_hessian(_hessian(40), W)
    U, _, _ = damped_inverse_cholesky(H, 0.01)
    # blocks of 20 columns x 10 rows: int(target * 200) per block is exactly the carried count
    ours_w, ours_m = sparsegpt_prune(W, U, SparsitySpec(target, scope="layer"), blocksize=20)
    ref_w, ref_m = _reference_sparsegpt(W, U, target, 20)
    assert torch.equal(ours_m, ref_m)
    assert torch.allclose(ours_w, ref_w, atol=1e-5, rtol=1e-5)


def test_sparsegpt_group_of_layers_sharing_a_hessian_equals_one_at_a_time():
    torch.manual_seed(2)
    H = _hessian(48, seed=2)
    stats = LayerStats(n_tokens=400, input_sq_mean=torch.diagonal(H).clone(), hessian=H)
    weights = {"q": torch.randn(16, 48), "k": torch.randn(8, 48), "v": torch.randn(8, 48)}
    pruner = registry.create("sparsegpt", blocksize=16)
    ctx = PruneContext(sparsity=SparsitySpec(0.6))
    assert_group_prunes_each_as_alone(pruner, weights, stats, ctx, atol=1e-5,
                                      specs=(SparsitySpec(0.6, scope="layer"), SparsitySpec(0.6, scope="row"),
                                             SparsitySpec.parse("2:4")))


def test_engine_shares_statistics_between_linears_that_read_the_same_input():
    from prunebench.engines.layerwise import capture_block_inputs, collect_block_stats
    from prunebench.modeling.models import find_blocks, prunable_linears

    loaded = load_model("tiny:llama")
    cal = torch.randint(0, loaded.model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    hidden, args, kwargs = capture_block_inputs(loaded.model, cal, "cpu")
    _, blocks = find_blocks(loaded.model)
    linears = prunable_linears(blocks[0])
    groups, stats, _ = collect_block_stats(blocks[0], linears, "hessian", hidden, args, kwargs, "cpu")
    as_sets = [set(g) for g in groups]
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} in as_sets
    assert {"mlp.gate_proj", "mlp.up_proj"} in as_sets
    assert {"self_attn.o_proj"} in as_sets and {"mlp.down_proj"} in as_sets
    assert set(stats) == {g[0] for g in groups}


# --- OWL and AlphaPruning: the pure math ------------------------------------------------------

def test_owl_ratios_follow_the_paper_formula():
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0]), 2.0) == pytest.approx(20.0)
    d = [1.0, 2.0, 5.0]
    s = owl_sparsities(d, 0.7, 0.08)
    scaled = [(x - 1.0) / 4.0 * 0.16 for x in d]
    mean = sum(scaled) / 3
    assert s == pytest.approx([0.7 - x + mean for x in scaled])
    assert sum(s) / 3 == pytest.approx(0.7)  # the budget is kept
    assert s[0] > s[1] > s[2]  # more outliers, less pruning
    assert owl_sparsities([3.0, 3.0], 0.5, 0.08) == [0.5, 0.5]
    # N:8: the number pruned per group moves by whole weights around (M - N)
    assert owl_nm_pruned([1.0, 2.0, 3.0], 4, 2.0) == [5, 4, 3]


def test_hill_alpha_recovers_a_power_law_exponent():
    g = torch.Generator().manual_seed(0)
    true_alpha = 2.5
    u = torch.rand(4000, generator=g, dtype=torch.float64)
    sample = (1 - u) ** (-1.0 / (true_alpha - 1))  # Pareto with x_min = 1, density ~ x^-alpha
    eigs = sample.sort().values
    assert hill_alpha(eigs, 0) == pytest.approx(true_alpha, rel=0.08)
    assert alpha_peak(eigs) == pytest.approx(true_alpha, rel=0.25)


def test_alphapruning_keeps_the_parameter_weighted_budget():
    s = alpha_sparsities([2.0, 3.0, 4.0], [100, 100, 200], 0.6, 0.3)
    assert (s[0] * 100 + s[1] * 100 + s[2] * 200) / 400 == pytest.approx(0.6)
    assert s[0] < s[1] < s[2]  # heavier tail (smaller alpha), less pruning
    assert alpha_sparsities([3.0, 3.0], [1, 1], 0.5, 0.3) == [0.5, 0.5]


def test_spectrum_is_the_squared_singular_values():
    W = torch.randn(6, 9)
    assert torch.allclose(spectrum(W), torch.linalg.svdvals(W).double().pow(2).sort().values)


# --- the engine, the registry and the runner --------------------------------------------------

def _prune(name, sparsity, family="llama"):
    loaded = load_model(f"tiny:{family}")
    cal = torch.randint(0, loaded.model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    pruner = registry.create(name)
    ctx = PruneContext(sparsity=SparsitySpec.parse(sparsity), calibration=cal, progress=False, registry=registry)
    report = pruner.prune(loaded.model, ctx)
    return loaded.model, report


@pytest.mark.parametrize("name,sparsity", [("wanda+owl", "0.7"), ("sparsegpt+alphapruning", "0.6"),
                                           ("magnitude+owl", "0.5"), ("wanda+owl", "4:8")])
def test_allocation_gives_each_block_its_target(name, sparsity):
    model, report = _prune(name, sparsity)
    info = report.stats["allocation"]
    assert len(info["block_targets"]) == len(info["block_achieved"]) == len(info["block_scores"])
    assert len(set(info["block_labels"])) > 1  # not uniform
    named = [(n, weight_matrix(m)) for n, m in all_prunable(model).items()]
    spec = SparsitySpec.parse(sparsity)
    check_output(named, spec, report.stats["scope"] if spec.pattern != "nm" else "layer", layer_specs=report.layer_specs)
    for label, achieved in zip(info["block_targets"], info["block_achieved"]):
        assert abs(label - achieved) < 0.05
    if spec.pattern == "nm":
        assert all(lab.endswith(":8") for lab in info["block_labels"])


def test_a_mask_off_its_block_target_fails_the_check():
    model, report = _prune("wanda+owl", "0.7")
    named = [(n, weight_matrix(m).clone()) for n, m in all_prunable(model).items()]
    # give the first layer the uniform target instead of its block's
    first, w = named[0]
    assert abs(report.layer_specs[first].target - 0.7) > 0.02  # the tiny model's blocks differ
    check_output(named, SparsitySpec(0.7), "row", layer_specs=report.layer_specs)
    named[0] = (first, torch.randn_like(w) * mask_from_scores(torch.rand_like(w), SparsitySpec(0.7, scope="row")))
    with pytest.raises(OutputCheckError):
        check_output(named, SparsitySpec(0.7), "row", layer_specs=report.layer_specs)


@pytest.mark.parametrize("method,spec,message", [("wanda+owl", "2:4", "N:8"),
                                                  ("wanda+alphapruning", "2:4", "does not support the 2:4 pattern")])
def test_a_grid_refuses_an_allocation_at_a_pattern_it_cannot_give_before_any_model_loads(method, spec, message):
    """Found on Gemma-3-270M: these were refused only when the cell ran (the grid asked the
    method, not its allocation)."""
    grid = grid_from_dict({"models": ["tiny:llama"], "methods": [method], "sparsities": [spec],
                           "calibration": {"dataset": "lee", "n_samples": 2, "seqlen": 32},
                           "eval": {"perplexity": ["lee"], "seqlen": 32, "tasks": []}})
    with pytest.raises(UserError, match=message):
        grid.cells()


def test_composite_names_resolve_and_reject_what_does_not_compose():
    assert registry.resolve("Wanda+OWL") == "wanda+owl"
    assert registry.resolve("sparsegpt+alpha") == "sparsegpt+alphapruning"
    with pytest.raises(UserError, match="unknown sparsity allocation"):
        registry.resolve("wanda+nope")
    with pytest.raises(UserError, match="layer-wise"):
        registry.resolve("leap+owl")
    with pytest.raises(UserError, match="N:8"):
        _prune("wanda+owl", "2:4")
    pruner = registry.create("wanda+owl", {"allocation": {"lam": 0.1}})
    assert pruner.allocation.config.lam == 0.1
    assert registry.resolved_config(pruner)["allocation"]["lam"] == 0.1
    with pytest.raises(UserError):
        registry.create("wanda+owl", {"allocation": {"lambda": 0.1}})  # unknown key
    assert registry.create("magnitude+owl").capabilities.needs_calibration  # OWL reads activations
    assert not registry.create("magnitude+alphapruning").capabilities.needs_calibration


def test_allocation_changes_the_cell_key():
    grid = grid_from_dict({"models": ["tiny:llama"], "methods": ["wanda", "wanda+owl", {"name": "wanda+owl", "config": {"allocation": {"lam": 0.1}}}],
                           "sparsities": ["0.7"], "include_dense": False,
                           "calibration": {"n_samples": 2, "seqlen": 16}, "eval": {"perplexity": ["lee"], "seqlen": 16}})
    keys = [c.key for c in grid.cells()]
    assert len(set(keys)) == 3


def test_runner_records_per_block_targets(tmp_path):
    rc = main(["run", "--models", "tiny:llama", "--methods", "wanda+owl", "--sparsities", "0.7", "--no-dense",
               "--n-samples", "2", "--seqlen", "16", "--max-ppl-windows", "2", "--ppl", "lee", "--tasks", "none",
               "--seeds", "0", "--results", str(tmp_path)])
    assert rc == 0
    (path,) = [p for p in (tmp_path / "records").glob("*.json")]
    record = json.loads(path.read_text())
    assert record["status"] == "ok"
    assert record["method"]["name"] == "wanda+owl"
    alloc = record["sparsity"]["allocation"]
    assert alloc["name"] == "owl" and len(alloc["block_targets"]) == 2
    assert abs(record["sparsity"]["achieved"] - 0.7) < 0.02
    from prunebench.report.build import build_report

    text = build_report(tmp_path)
    assert "Wanda + OWL" in text
    assert (tmp_path / "report" / "block_allocation__tiny-llama__0.7.png").exists()


def test_available_allocations_are_listed():
    assert {"owl", "alphapruning"} <= set(allocation.available())


def test_symmetric_gram_accumulation_equals_the_full_product():
    from prunebench.engines.layerwise import gram_add_

    g = torch.Generator().manual_seed(0)
    for n in (7, 384, 577, 1536):
        x = torch.randn(300, n, generator=g)
        out = gram_add_(torch.zeros(n, n), x)
        if n >= 384:  # the blocked path mirrors its upper triangle
            assert torch.equal(out, out.t())
        assert torch.allclose(out, x.t() @ x, rtol=1e-5, atol=1e-3)


def test_admm_group_of_layers_sharing_a_hessian_equals_one_at_a_time():
    torch.manual_seed(4)
    H = _hessian(32, seed=4)
    stats = LayerStats(n_tokens=400, input_sq_mean=torch.diagonal(H).clone(), hessian=H)
    weights = {"gate": torch.randn(12, 32), "up": torch.randn(12, 32)}
    ctx = PruneContext(sparsity=SparsitySpec(0.6))
    for pruner in (registry.create("admm"), registry.create("admm", mask_from="wanda")):
        assert_group_prunes_each_as_alone(pruner, weights, stats, ctx, atol=1e-4,
                                          specs=(SparsitySpec(0.6, scope="layer"), SparsitySpec.parse("2:4")))


def test_stopping_the_statistics_pass_early_changes_no_statistic():
    from prunebench.engines.layerwise import capture_block_inputs, collect_block_stats
    from prunebench.modeling.models import find_blocks, prunable_linears

    loaded = load_model("tiny:qwen2")
    cal = torch.randint(0, loaded.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    hidden, args, kwargs = capture_block_inputs(loaded.model, cal, "cpu")  # 4 batches of one window
    _, blocks = find_blocks(loaded.model)
    linears = prunable_linears(blocks[1])
    g1, early, none = collect_block_stats(blocks[1], linears, "hessian", hidden, args, kwargs, "cpu")
    g2, full, outs = collect_block_stats(blocks[1], linears, "hessian", hidden, args, kwargs, "cpu", keep_outputs=True)
    assert none is None and len(outs) == 4 and g1 == g2
    for name in early:
        assert early[name].n_tokens == full[name].n_tokens == 64
        assert torch.equal(early[name].hessian, full[name].hessian)
