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
    monkeypatch.setattr(ppl, "SCAN_ROWS", 7)  # 7 positions per scan
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


def _exact_kl_and_top1(dense_logits, logits, first):
    p = dense_logits[:, first - 1:-1].double().log_softmax(-1)
    q = logits[:, first - 1:-1].double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1), p.argmax(-1) == q.argmax(-1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("through_head", [True, False])
def test_dense_relative_metrics_against_the_full_vocabulary(family, through_head, monkeypatch):
    """The dense model against its own summary: KL 0, top-1 1.  A perturbed model: per-window KL
    sums equal the exact full-vocabulary KL when k is the vocabulary, and a smaller k gives a lower
    bound; top-1 agreement is exact at any k.  Small vocabulary blocks and row chunks throughout."""
    from prunebench.evaluate import dense_relative
    from prunebench.evaluate import perplexity as ppl
    from prunebench.modeling.output_head import OutputHead

    loaded = load_tiny(family)
    model, vocab = loaded.model, loaded.model.get_output_embeddings().out_features
    monkeypatch.setattr(ppl, "SCAN_ROWS", 7)  # 7 rows per scan
    monkeypatch.setattr(dense_relative, "BLOCK_BYTES", 4 * 7 * 37)  # 37 ids per block
    if not through_head:
        monkeypatch.setattr(OutputHead, "find", classmethod(lambda cls, model: None))
    ids = torch.randint(3, 250, (3 * 32 + 5,), generator=torch.Generator().manual_seed(0))
    prefix = [1] if family == "gemma3" else []
    kw = dict(batch_size=2, progress=False, prefix=prefix)
    windows, first = ppl.eval_windows(ids, 32, prefix=prefix), ppl.first_scored(prefix)
    plain = perplexity(model, ids, 32, **kw)
    dense_result, full = ppl.perplexity_and_summary(model, ids, 32, k=vocab, **kw)
    assert dense_result["window_nll"] == plain["window_nll"]  # the summary pass scores the same
    _, small = ppl.perplexity_and_summary(model, ids, 32, k=5, **kw)
    itself = perplexity(model, ids, 32, dense=small, **kw)["dense_relative"]
    assert itself["kl_mean"] < 1e-9 and itself["top1"] == 1.0 and itself["k"] == 5
    with torch.no_grad():
        dense_logits = model(input_ids=windows).logits
        layer = next(iter(all_prunable(model).values()))
        weight_matrix(layer).add_(torch.randn_like(weight_matrix(layer)) * 0.5)
        logits = model(input_ids=windows).logits
    kl, agree = _exact_kl_and_top1(dense_logits, logits, first)
    exact = perplexity(model, ids, 32, dense=full, **kw)["dense_relative"]
    assert exact["window_kl"] == pytest.approx(kl.sum(1).tolist(), rel=1e-4)
    assert exact["window_top1"] == agree.sum(1).tolist() and exact["dense_tail_mass"] == 0.0
    assert exact["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4) and exact["kl_mean"] > 1e-4
    bound = perplexity(model, ids, 32, dense=small, **kw)["dense_relative"]
    assert all(b <= e * (1 + 1e-5) for b, e in zip(bound["window_kl"], exact["window_kl"]))
    assert bound["window_top1"] == exact["window_top1"] and bound["dense_tail_mass"] > 0


def test_a_summary_of_other_windows_is_refused():
    from prunebench.evaluate import perplexity as ppl

    model = load_tiny("llama").model
    ids = torch.randint(3, 250, (4 * 32,), generator=torch.Generator().manual_seed(0))
    _, summary = ppl.perplexity_and_summary(model, ids, 32, k=4, progress=False, max_windows=3)
    with pytest.raises(ValueError, match="dense summary covers"):
        perplexity(model, ids, 32, progress=False, dense=summary)


def test_runner_records_dense_relative_and_reuses_the_dense_summary(tmp_path, monkeypatch):
    """The first pruned cell computes the dense summary once and writes it; the next cell of the
    session reuses it, a later run reads the file instead of recomputing it, and a damaged or
    foreign file fails the cell in one line."""
    from prunebench.run import runner
    from prunebench.cli.command import main
    from prunebench.store.records import load_records

    calls = []
    real = runner.perplexity_and_summary
    monkeypatch.setattr(runner, "perplexity_and_summary", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = tmp_path / "results"
    args = ["run", "--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5,0.7", "--ppl", "lee",
            "--seqlen", "32", "--max-ppl-windows", "3", "--tasks", "none", "--seeds", "0", "-q", "--results", str(results)]
    assert main(args) == 0
    recs = {r["sparsity"]["label"]: r for r in load_records(results)[0]}
    assert len(calls) == 1  # one dense pass for the whole run
    dense = recs["dense"]["eval"]["perplexity"]["lee"]["dense_relative"]
    assert dense["by_definition"] and dense["kl_mean"] == 0.0 and dense["top1"] == 1.0 and dense["kl_p99"] == 0.0
    a, b = (recs[s]["eval"]["perplexity"]["lee"]["dense_relative"] for s in ("0.5", "0.7"))
    assert 0 < a["kl_mean"] < b["kl_mean"] and b["top1"] < 1.0 and a["k"] == 64 and len(a["window_kl"]) == 3
    assert a["summary"]["computed_in_this_cell"] and not b["summary"]["computed_in_this_cell"]
    files = list((results / "work" / "dense").glob("*.safetensors"))
    assert [f"work/dense/{files[0].name}"] == [a["summary"]["file"]]

    assert main([*args, "--force"]) == 0  # a fresh session: the file is read, not recomputed
    assert len(calls) == 1
    again = {r["sparsity"]["label"]: r for r in load_records(results)[0]}
    assert again["0.5"]["eval"]["perplexity"]["lee"]["dense_relative"]["window_kl"] == a["window_kl"]

    data = bytearray(files[0].read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the tensors: the digest refuses it
    files[0].write_bytes(bytes(data))
    assert main([*args, "--force"]) == 1
    failed = {r["sparsity"]["label"]: r for r in load_records(results)[0]}  # ok records stay; attempts hold why
    from prunebench.store.records import attempt_records

    errors = [r["error"] for r in attempt_records(results) if r["status"] == "failed"]
    assert errors and all("dense summary" in e and "damaged" in e and "\n" not in e for e in errors)
    assert failed["0.5"]["status"] == "ok"


def test_a_foreign_summary_file_is_refused(tmp_path):
    from prunebench.evaluate.dense_relative import load_summary, save_summary, summarize_dense

    summary = summarize_dense(torch.randn(2, 5, 30), k=4)
    identity = {"windows_fingerprint": "a", "k": 4, "vocab": 30}
    save_summary(tmp_path / "s.safetensors", summary, identity)
    back = load_summary(tmp_path / "s.safetensors", identity)
    assert torch.equal(back.topk_ids, summary.topk_ids) and torch.equal(back.tail_logp, summary.tail_logp)
    with pytest.raises(UserError, match="made for other windows"):
        load_summary(tmp_path / "s.safetensors", {**identity, "windows_fingerprint": "b"})
    (tmp_path / "t.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(UserError, match="unreadable|not a prunebench"):
        load_summary(tmp_path / "t.safetensors", identity)
