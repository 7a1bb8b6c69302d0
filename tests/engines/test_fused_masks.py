"""The fused pattern-mask pass (prunebench.engines.fused_masks): the same masks and gradients as the torch
fallback and as autograd through the plain formula, on the counter noise; one result for any
thread count; the C++ path in use wherever a compiler is."""
import itertools
import math
import shutil

import pytest
import torch

from prunebench.engines import fused_masks
from prunebench.sparsity.patterns import expand_tiles

needs_cpp = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                               reason="no C++ compiler here: the torch path is the one in use")


def _table(n, m):
    rows = []
    for kept in itertools.combinations(range(m), n):
        rows.append([1.0 if j in kept else 0.0 for j in range(m)])
    return torch.tensor(rows)


def _case(shape, n, m, tile, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = _table(n, m)
    weight = torch.randn(shape, generator=gen)
    logits = torch.randn(shape[0] * shape[1] // m, table.shape[0], generator=gen) * 0.05
    gate = None
    if tile:
        gate = torch.rand(math.ceil(shape[0] / tile), math.ceil(shape[1] / tile), generator=gen)
    return table, weight, logits, gate


def _plain(logits, gate, weight, table, seed, kappa, tau, tile):
    """The formula as plain differentiable torch ops (autograd does the backward)."""
    z = (kappa * logits + fused_masks.counter_gumbel(logits.shape, seed)) / tau
    soft = (torch.softmax(z, dim=-1) @ table).view(weight.shape)
    mask = soft if gate is None else soft + expand_tiles(gate, tile, weight.shape) * (1 - soft)
    masked = mask * weight
    return masked, mask.sum(), masked.square().sum()


def _run(path, logits, gate, weight, table, seed, kappa, tau, tile, monkeypatch, threads=None):
    """Values and gradients (of a loss using all three outputs) through `path`: fused | fallback | plain."""
    lg = logits.clone().requires_grad_(True)
    gt = None if gate is None else gate.clone().requires_grad_(True)
    before = torch.get_num_threads()
    with monkeypatch.context() as mp:
        if path == "fallback":
            mp.setattr(fused_masks, "_extension", lambda: None)
        if threads:
            torch.set_num_threads(threads)
        try:
            if path == "plain":
                out = _plain(lg, gt, weight, table, seed, kappa, tau, tile)
            else:
                out = fused_masks.pattern_masked_weight(lg, weight, table, seed, kappa, tau, gt, tile)
            g = torch.randn(weight.shape, generator=torch.Generator().manual_seed(9))
            ((out[0] * g).sum() + 0.3 * out[1] + 0.7 * out[2]).backward()
        finally:
            torch.set_num_threads(before)
    return [o.detach() for o in out], lg.grad, None if gt is None else gt.grad


CASES = [((6, 8), 2, 4, 0), ((37, 4100), 2, 4, 0), ((40, 72), 2, 4, 16), ((33, 200), 2, 4, 8),
         ((12, 16), 1, 4, 0), ((10, 24), 2, 8, 0), ((20, 48), 3, 6, 12)]


@needs_cpp
def test_the_cpp_path_is_used_where_a_compiler_is():
    assert fused_masks.backend("cpu") == "cpp"


@pytest.mark.parametrize("shape,n,m,tile", CASES)
def test_fused_fallback_and_autograd_agree(shape, n, m, tile, monkeypatch):
    table, weight, logits, gate = _case(shape, n, m, tile)
    seed, kappa, tau = 2 ** 40 + 77, 30.0, 0.7
    plain = _run("plain", logits, gate, weight, table, seed, kappa, tau, tile, monkeypatch)
    paths = ["fallback"] + (["fused"] if fused_masks.backend("cpu") == "cpp" else [])
    for path in paths:
        for threads in (1, 2):
            (masked, msum, msq), dp, dg = _run(path, logits, gate, weight, table, seed, kappa, tau, tile, monkeypatch,
                                               threads)
            torch.testing.assert_close(masked, plain[0][0], rtol=1e-5, atol=1e-6)
            assert msum.item() == pytest.approx(plain[0][1].item(), rel=1e-5)
            assert msq.item() == pytest.approx(plain[0][2].item(), rel=1e-5)
            # a peaked softmax's y (1 - y) carries float32 rounding: 1e-4 relative there
            torch.testing.assert_close(dp, plain[1], rtol=1e-4, atol=1e-4 * plain[1].abs().max().item())
            if gate is not None:
                torch.testing.assert_close(dg, plain[2], rtol=1e-4, atol=1e-5 * plain[2].abs().max().item())


@needs_cpp
@pytest.mark.parametrize("shape,n,m,tile", CASES)
def test_fused_pass_is_bitwise_the_same_for_any_thread_count(shape, n, m, tile, monkeypatch):
    table, weight, logits, gate = _case((shape[0] * 3, shape[1]), n, m, tile, seed=3)
    runs = [_run("fused", logits, gate, weight, table, 5, 100.0, 0.3, tile, monkeypatch, threads)
            for threads in (1, 2)]
    for a, b in zip(runs[0][0] + [runs[0][1]], runs[1][0] + [runs[1][1]]):
        assert torch.equal(a, b)
    if gate is not None:
        assert torch.equal(runs[0][2], runs[1][2])


def test_fused_and_fallback_give_the_same_hard_choice(monkeypatch):
    """The argmax pattern of each group's sample is what a run keeps moving towards: the two
    paths agree on it wherever the top two probabilities are not tied within float rounding."""
    table, weight, logits, _ = _case((64, 256), 2, 4, 0, seed=5)
    seed, kappa, tau = 11, 100.0, 1.0
    y = fused_masks.pattern_probabilities(logits, seed, kappa, tau)
    masked, _, _ = fused_masks.pattern_masked_weight(logits, weight, table, seed, kappa, tau)
    with monkeypatch.context() as mp:
        mp.setattr(fused_masks, "_extension", lambda: None)
        plain, _, _ = fused_masks.pattern_masked_weight(logits, weight, table, seed, kappa, tau)
    top2 = y.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    rows = (masked / weight).reshape(-1, 4)[clear]
    ref = (plain / weight).reshape(-1, 4)[clear]
    assert torch.equal(rows.argsort(dim=1, descending=True)[:, :2].sort(dim=1).values,
                       ref.argsort(dim=1, descending=True)[:, :2].sort(dim=1).values)


def test_counter_gumbel_is_gumbel_and_seeded():
    g = fused_masks.counter_gumbel((1 << 20,), 3)
    assert torch.isfinite(g).all() and g.abs().max().item() <= 16.7
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)  # Euler-Mascheroni
    assert g.var().item() == pytest.approx(math.pi ** 2 / 6, rel=0.01)
    assert torch.equal(g[:100], fused_masks.counter_gumbel((100,), 3))
    assert (g[:100] != fused_masks.counter_gumbel((100,), 4)).all()


def test_a_tile_that_splits_a_group_is_refused():
    table, weight, logits, gate = _case((16, 16), 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of the group size"):
        fused_masks.pattern_masked_weight(logits, weight, table, 1, 1.0, 1.0, gate, 6)
