"""DSnoT (methods/dsnot.py): the vectorised swap loop against a plain per-row reference, its
invariants (kept counts, N:M groups, the error it reports), the identity and the refusals of bad
input, and a tiny model through the engine."""
import dataclasses

import pytest
import torch

from prunebench import registry
from prunebench.errors import UserError
from prunebench.sparsity.patterns import SparsitySpec, is_valid_mask, mask_from_scores, n_to_prune

from prunebench.methods.dsnot import dsnot_swap, is_attention
from prunebench.methods.wanda import wanda_scores


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_rows(seed=0, rows=40, cols=96, spec="0.5"):
    """Weights, input moments with means of both signs and spread variances, and Wanda's mask."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mean = 0.3 * torch.randn(cols, generator=g)
    var = torch.exp(torch.randn(cols, generator=g))
    norm = (var + mean * mean).sqrt()
    keep = mask_from_scores(wanda_scores(W, norm), SparsitySpec.parse(spec).resolved("row"))
    return W, keep, mean, var, norm


def reference(W, keep, mean, var, norm, *, window=1.0, max_cycle=50, threshold=0.1, group=0, sign_stop=False):
    """DSnoT row by row with Python lists, in float64: grow the pruned weight whose W E[x] / Var[x]
    best offsets e (of e's sign), prune a kept one of the opposite sign in Wanda order (N:M: the
    Wanda-lowest initially kept weight still kept in the grown weight's group), until |e| <= the
    threshold, the cycle cap, a row out of candidates, or (sign_stop) a swap that flips e's sign."""
    W, mean, var, norm = W.double(), mean.double(), var.double(), norm.double()
    out, errors, swaps = keep.clone(), [], []
    for i in range(W.shape[0]):
        m = (W[i] * mean * window).tolist()
        score = (W[i] * mean * window / var).tolist()
        wanda = (W[i].abs() * norm).tolist()
        kept0 = keep[i].tolist()
        kept = list(kept0)
        cols = len(m)
        grow_up = sorted((j for j in range(cols) if not kept0[j] and m[j] > 0), key=lambda j: -score[j])
        grow_dn = sorted((j for j in range(cols) if not kept0[j] and m[j] < 0), key=lambda j: score[j])
        cut_neg = sorted((j for j in range(cols) if kept0[j] and m[j] < 0), key=lambda j: wanda[j])
        cut_pos = sorted((j for j in range(cols) if kept0[j] and m[j] > 0), key=lambda j: wanda[j])
        e = sum(m[j] for j in range(cols) if not kept0[j])
        sign0 = (e > 0) - (e < 0)
        n = 0
        for _ in range(max_cycle):
            if abs(e) <= threshold:
                break
            grow = grow_up if e > 0 else grow_dn
            if not grow:
                break
            j = grow[0]
            if group:
                start = j - j % group
                cands = [k for k in range(start, min(start + group, cols)) if kept0[k] and kept[k]]
                if not cands:
                    grow.pop(0)
                    continue
                k = min(cands, key=lambda k: wanda[k])
            else:
                cut = cut_neg if e > 0 else cut_pos
                if not cut:
                    break
                k = cut[0]
            after = e + m[k] - m[j]
            if sign_stop and ((after > 0) - (after < 0)) != sign0:
                break
            grow.pop(0)
            if not group:
                cut.pop(0)
            kept[j], kept[k], e, n = True, False, after, n + 1
        out[i] = torch.tensor(kept)
        errors.append(e)
        swaps.append(n)
    return out, torch.tensor(errors, dtype=torch.float64), torch.tensor(swaps)


def row_error(W, keep, mean, window=1.0):
    return (W.double() * mean.double() * window * (~keep)).sum(dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec,max_cycle,threshold,sign_stop", [
    ("0.5", 50, 0.1, False), ("0.7", 50, 0.1, False), ("0.5", 7, 0.01, False), ("0.5", 50, 0.1, True),
    ("0.3", 50, 0.0, False), ("2:4", 50, 0.1, True), ("2:4", 50, 0.1, False), ("4:8", 20, 0.05, True),
    ("1:4", 50, 0.0, False)])
def test_the_swap_loop_equals_a_plain_per_row_reference(seed, spec, max_cycle, threshold, sign_stop):
    sp = SparsitySpec.parse(spec)
    W, keep, mean, var, norm = make_rows(seed, spec=spec)
    group = sp.m if sp.pattern == "nm" else 0
    kw = dict(window=3.0, max_cycle=max_cycle, threshold=threshold, group=group, sign_stop=sign_stop)
    got, err, swaps = dsnot_swap(W, keep, mean, var, norm, **kw)
    want, want_err, want_swaps = reference(W, keep, mean, var, norm, **kw)
    assert torch.equal(got, want), f"{int((got != want).any(1).sum())} rows differ"
    assert torch.equal(swaps, want_swaps)
    assert torch.allclose(err.double(), want_err, atol=1e-4)
    assert int(swaps.sum()) > 0 and int(swaps.max()) <= max_cycle


@pytest.mark.parametrize("spec", ["0.5", "0.6", "2:4", "4:8"])
def test_kept_counts_groups_and_the_reported_error(spec):
    sp = SparsitySpec.parse(spec)
    W, keep, mean, var, norm = make_rows(5, rows=64, cols=128, spec=spec)
    group = sp.m if sp.pattern == "nm" else 0
    got, err, swaps = dsnot_swap(W, keep, mean, var, norm, window=4.0, group=group, sign_stop=group > 0)
    assert torch.equal(got.sum(1), keep.sum(1))  # every row keeps its count: swaps, never net removals
    if group:
        assert is_valid_mask(got, sp)
        assert torch.equal(got.reshape(64, -1, sp.m).sum(-1), keep.reshape(64, -1, sp.m).sum(-1))
    else:
        assert torch.all((~got).sum(1) == n_to_prune(128, sp.target))
    assert torch.allclose(err.double(), row_error(W, got, mean, 4.0), atol=1e-4)  # its bookkeeping is the truth
    before = row_error(W, keep, mean, 4.0).abs()
    final = row_error(W, got, mean, 4.0)
    assert final.abs().mean() < (0.5 if group else 0.25) * before.mean()
    if not group:
        # each row stopped at the threshold, at the cycle cap or out of candidates of the needed sign
        m = W.double() * mean.double() * 4.0
        growable = ((~got & ~keep) & (m * final.unsqueeze(1) > 0)).any(1)
        cuttable = ((got & keep) & (m * final.unsqueeze(1) < 0)).any(1)
        at_threshold, at_cap = final.abs() <= 0.1 + 1e-5, swaps == 50
        assert bool((at_threshold | at_cap | ~growable | ~cuttable).all())
        assert float(at_threshold.double().mean()) > 0.5


def test_rows_already_within_the_threshold_and_zero_cycles_are_left_alone():
    W, keep, mean, var, norm = make_rows(3)
    e = row_error(W, keep, mean)
    got, _, swaps = dsnot_swap(W, keep, mean, var, norm, threshold=float(e.abs().max()) + 1)
    assert torch.equal(got, keep) and int(swaps.sum()) == 0
    got, _, swaps = dsnot_swap(W, keep, mean, var, norm, max_cycle=0)
    assert torch.equal(got, keep) and int(swaps.sum()) == 0


def test_a_row_out_of_growth_candidates_stops_keeping_its_count():
    """Their pointers would walk into kept weights here; ours stop the row."""
    W = torch.tensor([[1.0, 2.0, 3.0, -4.0]])
    mean, var, norm = torch.ones(4), torch.ones(4), torch.ones(4)
    keep = torch.tensor([[False, True, True, True]])  # e = 1 > 0; one positive pruned weight
    got, err, swaps = dsnot_swap(W, keep, mean, var, norm, threshold=0.0)
    # grow 0 (+1), prune 3 (-4): e = -4 < 0, but nothing negative is left to grow: stop
    assert got.tolist() == [[True, True, True, False]] and float(err) == -4.0 and int(swaps) == 1


def test_attention_and_mlp_names():
    assert all(is_attention(n) for n in ("self_attn.q_proj", "attn.c_attn", "attention.dense"))
    assert not any(is_attention(n) for n in ("mlp.gate_proj", "mlp.c_fc", "fc1", "fc2"))


def test_defaults_statistics_scope_and_identity():
    from prunebench.provenance.identity import METHOD_FRAMEWORK_MODULES, method_identity, modules_sha256

    pruner = registry.create("dsnot")
    cfg = dataclasses.asdict(pruner.config)
    assert cfg == {"initial": "wanda", "initial_config": {}, "max_cycle": 50, "update_threshold": 0.1,
                   "skip": "none", "sign_stop": "nm"}
    assert pruner.capabilities.statistics == "input_moments" and pruner.default_scope == "row"
    sgpt = registry.create("dsnot", {"initial": "sparsegpt"})
    assert sgpt.capabilities.statistics == "hessian+input_moments" and sgpt.default_scope == "layer"
    mag = registry.create("dsnot", {"initial": "magnitude"})
    assert mag.capabilities.statistics == "input_moments"
    # the initial method's code is part of the identity: another initial, another key
    ids = {name: method_identity(registry.create("dsnot", {"initial": name}))["sha256"]
           for name in ("wanda", "magnitude", "sparsegpt")}
    assert len(set(ids.values())) == 3
    assert ids["magnitude"] == modules_sha256({"prunebench.methods.dsnot", "prunebench.methods.magnitude",
                                               "prunebench.methods.wanda", "prunebench.engines.layerwise",
                                               *METHOD_FRAMEWORK_MODULES})
    nested = registry.create("dsnot", {"initial": "dsnot", "initial_config": {"initial": "sparsegpt"}})
    assert nested.uses_methods() == ("dsnot", "sparsegpt")


def _cells(method, sparsities=("0.5",)):
    from prunebench.run.grid import GridSpec

    return GridSpec(models=["tiny:llama"], methods=[method], sparsities=list(sparsities)).cells()


@pytest.mark.parametrize("config,needle", [
    ({"initial": "nope"}, "dsnot: initial='nope': unknown method 'nope'"),
    ({"initial": "leap"}, "is not a layer-wise method"),
    ({"initial": "wanda+owl"}, "carries a sparsity allocation"),
    ({"initial": "sparsegpt", "initial_config": {"blocksize": -1}}, "dsnot: initial_config for 'sparsegpt'"),
    ({"skip": "mlps"}, "skip in"), ({"sign_stop": "yes"}, "sign_stop in"), ({"max_cycle": -1}, "max_cycle >= 0"),
    ({"update_threshold": -0.1}, "update_threshold >= 0"), ({"update_threshold": float("nan")}, "finite"),
    ({"max_cycle": 5.0}, "max_cycle"), ({"nonsense": 1}, "unknown option")])
def test_bad_config_is_one_line_before_any_model(config, needle):
    with pytest.raises(UserError) as info:
        _cells({"name": "dsnot", "config": config})
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_patterns_dsnot_or_its_initial_cannot_give_are_refused_in_one_line(monkeypatch):
    with pytest.raises(UserError) as info:
        _cells("dsnot", ["hybrid:0.35/16"])
    assert "'dsnot' does not support the dense|2:4 tiles pattern" in str(info.value)
    assert len(_cells("dsnot", ["0.5", "2:4"])) == 3  # dense + two
    wanda = registry.get("wanda")
    monkeypatch.setattr(wanda, "capabilities", dataclasses.replace(wanda.capabilities, patterns=("unstructured",)))
    with pytest.raises(UserError) as info:
        _cells("dsnot", ["0.5", "2:4"])
    message = str(info.value)
    assert "dsnot: initial method 'wanda' does not support the 2:4 pattern" in message and "\n" not in message
    assert len(_cells({"name": "dsnot", "config": {"initial": "magnitude"}}, ["2:4"])) == 2


@pytest.mark.parametrize("spec", ["0.5", "0.6@layer", "2:4"])
def test_tiny_model(spec, calib_windows):
    """Through the engine: the initial Wanda mask's counts are kept (per row, per layer, per group),
    kept weights are the dense ones, the masks differ from Wanda's, and skip: mlp leaves every MLP
    linear with Wanda's mask."""
    from prunebench.run.conformance import prune_tiny
    from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix

    spec = SparsitySpec.parse(spec)
    dense = {n: weight_matrix(m).detach().clone() for n, m in all_prunable(load_tiny("llama", seed=0).model).items()}
    wanda, _ = prune_tiny("wanda", "llama", spec, calib_windows)
    ours, report = prune_tiny("dsnot", "llama", spec, calib_windows)
    skipping, _ = prune_tiny("dsnot", "llama", spec, calib_windows, config={"skip": "mlp"})
    assert report.updates_weights is False and report.stats["scope"] == spec.resolved("row").scope
    changed = 0

    def counts(keep):
        """What the initial mask fixes and the swaps keep: kept weights per row, or per layer at
        scope layer (its rows' counts follow their inputs, which differ beyond block 0)."""
        return int(keep.sum()) if spec.scope == "layer" else keep.sum(1).tolist()

    for name, w in ours.items():
        keep, keep0 = w != 0, wanda[name] != 0
        assert torch.equal(w[keep], dense[name][keep]), name
        assert counts(keep) == counts(keep0), name
        if spec.pattern == "nm":
            assert is_valid_mask(keep, spec), name
        changed += int((keep != keep0).sum())
        if name.startswith("model.layers.0."):  # later blocks see other inputs once an MLP was skipped
            assert torch.equal(skipping[name] != 0, keep0 if ".mlp." in name else keep), name
        assert counts(skipping[name] != 0) == counts(keep0), name
    assert changed > 0
