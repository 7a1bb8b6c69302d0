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
