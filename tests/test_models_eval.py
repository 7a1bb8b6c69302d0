import math

import pytest
import torch
import torch.nn.functional as F

from prunebench.errors import UserError
from prunebench.evaluate.perplexity import perplexity
from prunebench.modeling.models import (
    all_prunable, check_model_spec, describe_model, load_model, load_tiny, weight_matrix
)

from conftest import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_models_expose_blocks_and_decoder_linears_only(family):
    model = load_tiny(family).model
    info = describe_model(model)
    assert info["n_blocks"] == 2 and info["n_prunable_layers"] >= 8
    names = list(all_prunable(model))
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    for m in all_prunable(model).values():
        assert weight_matrix(m).dim() == 2


def test_perplexity_matches_a_direct_computation():
    loaded = load_tiny("llama")
    torch.manual_seed(0)
    ids = torch.randint(0, 250, (3 * 32 + 5,))
    result = perplexity(loaded.model, ids, 32, batch_size=2, progress=False)
    assert result["n_windows"] == 3 and result["seqlen"] == 32 and result["n_tokens"] == 3 * 31
    with torch.no_grad():
        windows = ids[:96].view(3, 32)
        logits = loaded.model(input_ids=windows).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result["value"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("through_head", [True, False])
def test_perplexity_in_chunks_scores_every_token_as_the_full_logits_do(family, through_head, monkeypatch):
    """Evaluation applies the vocabulary head a few tokens at a time (or scores the model's own
    logits a few positions at a time when its head cannot be split off): each window's NLL sum is
    the full computation's, with a sequence start and without, whatever the chunk size."""
    from prunebench.evaluate import perplexity as ppl
    from prunebench.modeling.output_head import OutputHead

    loaded = load_tiny(family)
    vocab = loaded.model.get_output_embeddings().out_features
    monkeypatch.setattr(ppl, "SCORE_CHUNK_BYTES", 4 * vocab * 7)  # 7 tokens per chunk
    if not through_head:
        monkeypatch.setattr(OutputHead, "find", classmethod(lambda cls, model: None))
    torch.manual_seed(0)
    ids = torch.randint(3, 250, (3 * 32 + 5,))
    for prefix in ([], [1]):
        result = perplexity(loaded.model, ids, 32, batch_size=2, progress=False, prefix=prefix)
        windows = ppl.eval_windows(ids, 32, prefix=prefix)
        first = ppl.first_scored(prefix)
        with torch.no_grad():
            logits = loaded.model(input_ids=windows).logits.float()
            full = F.cross_entropy(logits[:, first - 1:-1].reshape(-1, logits.shape[-1]),
                                   windows[:, first:].reshape(-1), reduction="none").view(3, -1).double().sum(1)
        assert result["window_nll"] == pytest.approx(full.tolist(), rel=1e-5)


def test_local_directory_loads_through_from_pretrained(tmp_path):
    tiny = load_tiny("qwen2")
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.info["source"] == "local" and loaded.info["family"] == "qwen2"
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("spec", ["nosuch", "tiny:bert", "missing.gguf", "a/b/c", "./x",
                                  "gemma3-1b", "smollm2-360m"])  # embedded families, not embedded sizes
def test_bad_model_specs(spec):
    with pytest.raises(UserError):
        check_model_spec(spec)
