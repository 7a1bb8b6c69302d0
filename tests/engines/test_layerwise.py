import pytest
import torch

from prunebench.engines.layerwise import LayerwisePruner, StatsAccumulator, capture_block_inputs, run_block
from prunebench.modeling.models import find_blocks, load_tiny, prunable_linears
from prunebench.contract import (STATS_HESSIAN, STATS_INPUT_MOMENTS, STATS_INPUT_NORM, STATS_NONE, Capabilities,
                                 LayerStats, LinearResult, PruneContext, combine_stats)
from prunebench.sparsity.patterns import SparsitySpec, mask_from_scores

from conftest import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_captured_inputs_reproduce_the_models_own_hidden_states(family, calib_windows):
    """Block i fed the captured arguments gives the model's own hidden state i+1 (dense)."""
    model = load_tiny(family).model
    windows = calib_windows[:2]
    hidden, args, kwargs = capture_block_inputs(model, windows, "cpu")
    with torch.no_grad():
        ref = model(input_ids=windows[:1], output_hidden_states=True, use_cache=False).hidden_states
    assert torch.allclose(hidden[0], ref[0], atol=1e-5)
    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks[:-1]):  # the last hidden state has the final norm applied
        hidden = run_block(block, hidden, args, kwargs, "cpu")
        assert torch.allclose(hidden[0], ref[i + 1], atol=1e-4), f"{family}: block {i} output differs"


def test_statistics_accumulate_exactly():
    torch.manual_seed(0)
    xs = [torch.randn(1, 5, 6) for _ in range(3)]
    acc_n = StatsAccumulator(6, STATS_INPUT_NORM, "cpu")
    acc_h = StatsAccumulator(6, STATS_HESSIAN, "cpu")
    for x in xs:
        acc_n.add(x)
        acc_h.add(x)
    X = torch.cat([x.reshape(-1, 6) for x in xs])
    assert acc_n.result().n_tokens == 15
    assert torch.allclose(acc_n.result().input_sq_mean, (X * X).mean(0))
    assert torch.allclose(acc_h.result().hessian, X.t() @ X / 15, atol=1e-6)
    assert torch.allclose(acc_h.result().input_norm, X.norm(dim=0) / 15 ** 0.5, atol=1e-6)
    assert acc_n.result().input_mean is None and acc_h.result().input_mean is None  # only when asked for


def test_input_moments_give_the_mean_and_variance_and_combine_with_the_hessian():
    torch.manual_seed(0)
    xs = [3.0 + torch.randn(2, 7, 6) * torch.arange(1, 7) for _ in range(4)]
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    both = combine_stats(STATS_HESSIAN, STATS_INPUT_MOMENTS, STATS_NONE)
    assert both == "hessian+input_moments" and combine_stats(STATS_NONE) == STATS_NONE
    for kind in (STATS_INPUT_MOMENTS, both):
        acc = StatsAccumulator(6, kind, "cpu")
        for x in xs:
            acc.add(x)
        st = acc.result()
        assert st.n_tokens == 56 and st.input_mean.dtype == torch.float32
        assert torch.allclose(st.input_mean.double(), X.mean(0), atol=1e-5)
        assert torch.allclose(st.input_sq_mean.double(), (X * X).mean(0), rtol=1e-5)
        assert torch.allclose(st.input_var.double(), X.var(0, unbiased=False), rtol=1e-4)
        assert (st.hessian is not None) == (kind == both)
    with pytest.raises(ValueError, match="input_moments"):
        StatsAccumulator(6, STATS_INPUT_NORM, "cpu").result().input_var


def _one_off(prune_linear, statistics=STATS_NONE):
    from dataclasses import dataclass

    class OneOff(LayerwisePruner):
        name = "one_off_test"
        capabilities = Capabilities(statistics=statistics, needs_calibration=statistics != STATS_NONE)

        @dataclass
        class Config:
            pass

    OneOff.prune_linear = lambda self, weight, stats, spec, ctx: prune_linear(weight, stats, spec)
    return OneOff()


def test_a_bare_mask_is_refused_saying_what_came_and_what_to_return():
    pruner = _one_off(lambda w, stats, spec: mask_from_scores(w.abs(), spec))
    with pytest.raises(TypeError) as info:
        pruner.prune(load_tiny("llama").model, PruneContext(sparsity=SparsitySpec(0.5), progress=False))
    message = str(info.value)
    assert "returned a bare torch.bool tensor" in message and "LinearResult(mask=" in message, message
    pruner = _one_off(lambda w, stats, spec: None)
    with pytest.raises(TypeError, match="returned NoneType; return LinearResult"):
        pruner.prune(load_tiny("llama").model, PruneContext(sparsity=SparsitySpec(0.5), progress=False))


def test_the_engine_reports_whether_new_weights_came_back(calib_windows):
    """PruneReport.updates_weights is observed by prune_layerwise itself: no wrapper around the
    method (the instance keeps its own prune_group)."""
    keep = _one_off(lambda w, stats, spec: LinearResult(mask=mask_from_scores(w.abs(), spec)))
    moved = _one_off(lambda w, stats, spec: LinearResult(mask=mask_from_scores(w.abs(), spec), weight=w * 1.01))
    ctx = PruneContext(sparsity=SparsitySpec(0.5), progress=False)
    assert keep.prune(load_tiny("llama").model, ctx).updates_weights is False
    assert moved.prune(load_tiny("llama").model, ctx).updates_weights is True
    assert "prune_group" not in vars(keep) and "prune_group" not in vars(moved)
    from prunebench.engines.layerwise import prune_layerwise

    assert prune_layerwise(load_tiny("llama").model, moved, ctx).updates_weights is True


def test_engine_feeds_each_block_the_pruned_outputs_of_the_previous(calib_windows):
    """The statistics seen by block 1 come from block 0 *after* pruning (sequential protocol)."""
    seen = []  # input statistics in call order: block 0's seven linears, then block 1's

    class Recorder(LayerwisePruner):
        name = "recorder_test"
        capabilities = Capabilities(statistics=STATS_INPUT_NORM)

        from dataclasses import dataclass

        @dataclass
        class Config:
            pass

        def prune_linear(self, weight, stats, spec, ctx):
            seen.append(stats.input_sq_mean.clone())
            return LinearResult(mask=mask_from_scores(weight.abs(), spec))

    loaded = load_tiny("llama")
    model = loaded.model
    windows = calib_windows[:3]
    Recorder().prune(model, PruneContext(sparsity=SparsitySpec(0.5), calibration=windows, progress=False))
    # recompute block-1 q_proj input statistics by running the (now pruned) model
    _, blocks = find_blocks(model)
    captured = []
    h = blocks[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    h.remove()
    X = torch.cat(captured)
    assert len(seen) == 14
    assert torch.allclose(seen[7], (X * X).mean(0), rtol=1e-4, atol=1e-6)
