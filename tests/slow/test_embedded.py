"""The one property that needs a real language model: on SmolLM2-135M, 50% unstructured Wanda
keeps perplexity far closer to dense than magnitude does (the Wanda paper's finding)."""
import pytest
import torch

from prunebench import registry
from prunebench.data.windows import WindowSpec, calibration_windows, eval_tokens
from prunebench.evaluate.perplexity import perplexity
from prunebench.modeling.models import EMBEDDED_MODEL, load_model, restore_prunable, snapshot_prunable
from prunebench.contract import PruneContext
from prunebench.sparsity.patterns import SparsitySpec

pytestmark = pytest.mark.slow


def test_wanda_beats_magnitude_on_the_embedded_model():
    loaded = load_model(EMBEDDED_MODEL)
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.info["n_blocks"] == 30 and loaded.info["n_prunable_layers"] == 210
    calib, _ = calibration_windows(tok, WindowSpec("lee", 8, 256, 0))
    ev = eval_tokens(tok, "lee")
    dense_weights = snapshot_prunable(model)
    ppl = {"dense": perplexity(model, ev, 256, batch_size=4, max_windows=8, progress=False)["value"]}
    for method in ("magnitude", "wanda"):
        restore_prunable(model, dense_weights)
        ctx = PruneContext(sparsity=SparsitySpec(0.5), calibration=calib, progress=False, registry=registry)
        registry.create(method).prune(model, ctx)
        ppl[method] = perplexity(model, ev, 256, batch_size=4, max_windows=8, progress=False)["value"]
    assert ppl["dense"] < 60, ppl  # a real LM on real English
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"], ppl
