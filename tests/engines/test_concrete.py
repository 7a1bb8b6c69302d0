"""The fused binary-concrete gate pass (prunebench.engines.concrete): the same gates and gradients as the
plain torch ops on the same counter noise, the noise's distribution, and one result for any
thread count."""
import math

import pytest
import torch

from prunebench.engines import concrete


def _reference(logits, weight, seed, alpha, tau):
    """The gates as plain differentiable torch ops on the counter noise."""
    noise = concrete.counter_logistic(logits.shape, seed)
    mask = torch.sigmoid((alpha * logits + noise) / tau)
    mask = torch.where(mask < concrete.MASK_FLOOR, torch.zeros_like(mask), mask)
    masked = mask * weight
    return masked, mask.sum(), masked.square().sum()


@pytest.mark.parametrize("use_cpp", [True, False])
def test_fused_pass_matches_torch_ops_values_and_gradients(use_cpp, monkeypatch):
    if use_cpp and concrete.backend("cpu") != "cpp":
        pytest.skip("no C++ compiler here: the torch path is the one in use")
    if not use_cpp:
        monkeypatch.setattr(concrete, "_extension", lambda: None)
    gen = torch.Generator().manual_seed(0)
    shape = (37, 4099)  # not a multiple of the kernel's chunk or lanes
    logits = (torch.randn(shape, generator=gen) * 0.05).requires_grad_(True)
    weight = torch.randn(shape, generator=gen)
    seed, alpha, tau = 2 ** 40 + 12345, 100.0, 0.7
    masked, msum, msq = concrete.concrete_masked_weight(logits, weight, seed, alpha, tau)
    ref_logits = logits.detach().clone().requires_grad_(True)
    r_masked, r_sum, r_sq = _reference(ref_logits, weight, seed, alpha, tau)
    torch.testing.assert_close(masked, r_masked, rtol=1e-5, atol=1e-6)
    assert msum.item() == pytest.approx(r_sum.item(), rel=1e-5)
    assert msq.item() == pytest.approx(r_sq.item(), rel=1e-4)
    g = torch.randn(shape, generator=gen)
    (masked * g).sum().add(3 * msum).add(0.5 * msq).backward()
    (r_masked * g).sum().add(3 * r_sum).add(0.5 * r_sq).backward()
    # (1 - M) of a nearly saturated gate carries the float32 rounding of M: relative 1e-3 there
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-3, atol=1e-4)
    # saturated gates are exactly zero, not denormal
    assert ((masked == 0) | (masked.abs() > 1e-30)).all()


def test_counter_noise_is_logistic_and_a_function_of_seed_and_index():
    u = concrete.counter_uniform(1 << 20, 7)
    assert u.min().item() >= 2 ** -24 and u.max().item() <= 1 - 2 ** -24
    assert u.mean().item() == pytest.approx(0.5, abs=2e-3)
    # uniform over ten bins: every bin within 1% of its share
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert (counts / u.numel() - 0.1).abs().max().item() < 1e-3
    noise = concrete.counter_logistic((1 << 20,), 7)
    assert torch.isfinite(noise).all()
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.var().item() == pytest.approx(math.pi ** 2 / 3, rel=0.01)
    # neighbours are not correlated, other seeds draw other numbers, the same seed the same ones
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01
    assert torch.equal(u[:1000], concrete.counter_uniform(1000, 7))
    assert (u[:1000] != concrete.counter_uniform(1000, 8)).float().mean().item() > 0.99
    assert (u[:1000] != concrete.counter_uniform(1000, 7 + (1 << 32))).float().mean().item() > 0.99


def test_fused_pass_gives_one_result_for_any_thread_count():
    if concrete.backend("cpu") != "cpp":
        pytest.skip("no C++ compiler here")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 1000, generator=gen) * 0.05
    weight = torch.randn(300, 1000, generator=gen)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(concrete.concrete_masked_weight(logits, weight, 99, 50.0, 0.5))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
