import pytest
import torch

from prunebench import registry
from prunebench.layerwise import StatsAccumulator, capture_block_inputs, run_block
from prunebench.models import find_blocks, load_tiny, prunable_linears
from prunebench.registry import STATS_HESSIAN, STATS_INPUT_NORM, LayerStats, LinearResult, PruneContext
from prunebench.sparsity import SparsitySpec, mask_from_scores

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


def test_engine_feeds_each_block_the_pruned_outputs_of_the_previous(calib_windows):
    """The statistics seen by block 1 come from block 0 *after* pruning (sequential protocol)."""
    seen = []  # input statistics in call order: block 0's seven linears, then block 1's

    class Recorder(registry.LayerwisePruner):
        name = "recorder_test"
        capabilities = registry.Capabilities(statistics=STATS_INPUT_NORM)

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
