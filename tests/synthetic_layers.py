"""Synthetic layers for the layer-wise methods' tests: correlated inputs with column scales
spread over ~2 orders of magnitude (a mixing matrix plus low-rank common factors), the regime
where weight updates beat plain masking and activation-aware masks beat magnitude."""
import pytest
import torch

from prunebench import registry
from prunebench.contract import LayerStats, PruneContext


@pytest.fixture
def one_thread():
    """The machine is shared and these tensors are tiny."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_layer(seed=0, n=2048, d_in=128, d_out=64, rank=8):
    """(X [n, d_in], W [d_out, d_in], LayerStats with H = X^T X / n and its diagonal)."""
    g = torch.Generator().manual_seed(seed)
    A = 0.3 * torch.eye(d_in) + torch.randn(d_in, d_in, generator=g) / d_in ** 0.5
    X = torch.randn(n, d_in, generator=g) @ A
    X = X + torch.randn(n, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    X = X * torch.exp(torch.randn(d_in, generator=g))
    W = torch.randn(d_out, d_in, generator=g)
    H = X.T @ X / n
    return X, W, LayerStats(n_tokens=n, hessian=H, input_sq_mean=torch.diagonal(H).clone())


def recon_error(X, W, W_hat) -> float:
    return float(((X @ (W - W_hat).T) ** 2).sum())


def prune_one(name, W, stats, spec, **config):
    """(result, pruned weights, resolved spec): one matrix pruned by a registered method, as the
    engine would call it."""
    pruner = registry.create(name, config)
    spec = spec.resolved(pruner.default_scope)
    res = pruner.prune_linear(W.clone(), stats, spec, PruneContext(sparsity=spec, registry=registry))
    return res, (res.weight if res.weight is not None else W * res.mask), spec
