"""The fused pattern-mask pass (prunebench.engines.fused_masks): the same masks and gradients as the torch
fallback and as autograd through the plain formula, on the counter noise; one result for any
thread count; the C++ path in use wherever a compiler is."""
import hashlib
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


def _exact_case(shape, n, m, tile):
    """Inputs that are exact float32 values whatever the platform (no generator, no libm)."""
    table = _table(n, m)
    count = shape[0] * shape[1]
    i = torch.arange(count, dtype=torch.float64)
    weight = (((i * 7919) % 1001 - 500) / 256).float().view(shape)
    logits = (((torch.arange(count // m * table.shape[0], dtype=torch.float64) * 104729) % 997 - 498) / 8192)
    logits = logits.float().view(-1, table.shape[0])
    grad = (((i * 15485863) % 499 - 249) / 128).float().view(shape)
    gate = None
    if tile:
        tiles = math.ceil(shape[0] / tile) * math.ceil(shape[1] / tile)
        gate = ((torch.arange(tiles, dtype=torch.float64) * 37 % 64 + 0.5) / 64).float().view(
            math.ceil(shape[0] / tile), -1)
    return table, weight, logits, gate, grad


# sha256 (first 16 hex digits) of the C++ path's masked weight, mask sum, squared norm and the two
# gradients, recorded with the per-group loops this pass had before its loops ran across groups:
# any rewrite must keep each value's operations and their order, so these stay bit for bit.
RECORDED = {((37, 4100), 2, 4, 0): "f2fad4244353bc02", ((40, 72), 2, 4, 16): "70557581ba5543d1",
            ((33, 200), 2, 4, 8): "88896c243cc85ebe", ((12, 16), 1, 4, 0): "920780d7b026518a",
            ((20, 48), 3, 6, 12): "1e23a3eb556cde3a"}


@needs_cpp
@pytest.mark.parametrize("shape,n,m,tile", list(RECORDED))
def test_the_fused_pass_keeps_its_recorded_values(shape, n, m, tile):
    table, weight, logits, gate, grad = _exact_case(shape, n, m, tile)
    lg = logits.clone().requires_grad_(True)
    gt = None if gate is None else gate.clone().requires_grad_(True)
    masked, msum, msq = fused_masks.pattern_masked_weight(lg, weight, table, 2 ** 40 + 77, 30.0, 0.7, gt, tile)
    ((masked * grad).sum() + 0.3 * msum + 0.7 * msq).backward()
    digest = hashlib.sha256()
    for t in [masked, msum, msq, lg.grad] + ([] if gt is None else [gt.grad]):
        digest.update(t.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest()[:16] == RECORDED[(shape, n, m, tile)]


@needs_cpp
def test_a_second_backward_through_a_retained_graph_gives_the_same_gradients():
    """The first backward writes the logits' gradient over the saved probabilities; a second one
    draws them again."""
    table, weight, logits, gate = _case((40, 72), 2, 4, 16)
    lg, gt = logits.clone().requires_grad_(True), gate.clone().requires_grad_(True)
    masked, msum, msq = fused_masks.pattern_masked_weight(lg, weight, table, 3, 100.0, 0.5, gt, 16)
    loss = masked.square().sum() + 0.3 * msum + 0.7 * msq
    loss.backward(retain_graph=True)
    first = lg.grad.clone(), gt.grad.clone()
    lg.grad, gt.grad = None, None
    loss.backward()
    assert torch.equal(lg.grad, first[0]) and torch.equal(gt.grad, first[1])


@needs_cpp
def test_activation_checkpointing_recomputes_the_saved_probabilities():
    """Non-reentrant checkpointing (the engine's) drops what backward saved and recomputes it."""
    table, weight, logits, gate = _case((40, 72), 2, 4, 16)
    grads = []
    for checkpointed in (False, True):
        lg, gt = logits.clone().requires_grad_(True), gate.clone().requires_grad_(True)

        def loss_of(lg, gt):
            masked, msum, msq = fused_masks.pattern_masked_weight(lg, weight, table, 3, 100.0, 0.5, gt, 16)
            return masked.square().sum() + 0.3 * msum + 0.7 * msq

        loss = torch.utils.checkpoint.checkpoint(loss_of, lg, gt, use_reentrant=False) if checkpointed \
            else loss_of(lg, gt)
        loss.backward()
        grads.append((lg.grad, gt.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
