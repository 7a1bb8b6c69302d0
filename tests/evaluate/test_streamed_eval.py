"""Perplexity with one block at a time equals the plain whole-model perplexity, for every family."""
import pytest

from prunebench.data.windows import eval_tokens
from prunebench.evaluate.perplexity import perplexity, perplexity_streamed
from prunebench.modeling.models import load_tiny

from conftest import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_streamed_perplexity_matches(family):
    loaded = load_tiny(family)
    ids = eval_tokens(loaded.tokenizer, "lee", None)
    plain = perplexity(loaded.model, ids, 64, progress=False, max_windows=5)
    streamed = perplexity_streamed(loaded.model, ids, 64, progress=False, max_windows=5, chunk_windows=2)
    assert streamed["value"] == pytest.approx(plain["value"], rel=1e-5)
    assert streamed["n_tokens"] == plain["n_tokens"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_dense_relative_matches(family):
    """The streamed path scores the dense-relative metrics from the same scan as the plain one."""
    import torch

    from prunebench.evaluate.perplexity import perplexity_and_summary
    from prunebench.modeling.models import all_prunable, weight_matrix

    loaded = load_tiny(family)
    ids = eval_tokens(loaded.tokenizer, "lee", None)
    _, summary = perplexity_and_summary(loaded.model, ids, 64, k=8, progress=False, max_windows=5)
    with torch.no_grad():
        w = weight_matrix(next(iter(all_prunable(loaded.model).values())))
        w.mul_(torch.rand_like(w) > 0.5)
    plain = perplexity(loaded.model, ids, 64, progress=False, max_windows=5, dense=summary)["dense_relative"]
    streamed = perplexity_streamed(loaded.model, ids, 64, progress=False, max_windows=5, chunk_windows=2,
                                   dense=summary)["dense_relative"]
    assert plain["kl_mean"] > 0
    assert streamed["window_kl"] == pytest.approx(plain["window_kl"], rel=1e-4)
    assert streamed["window_top1"] == plain["window_top1"]
