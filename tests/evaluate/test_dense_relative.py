"""KL(dense || pruned) and top-1 agreement from a top-k summary of the dense model."""
import torch

import math

import torch.nn.functional as F

from prunebench.evaluate.dense_relative import (
    aggregate, dense_histogram, histogram_quantile, log10_histogram, scan_vocabulary, sparse_histogram,
    summarize_dense, token_kl_and_top1, window_summaries
)


def _logits(seed, shape=(3, 7, 50), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _exact_kl(dense, pruned):
    p, q = dense.double().log_softmax(-1), pruned.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_full_k_is_the_exact_kl():
    dense, pruned = _logits(0), _logits(1)
    kl, agree = token_kl_and_top1(summarize_dense(dense, k=50), pruned)
    torch.testing.assert_close(kl, _exact_kl(dense, pruned), rtol=1e-5, atol=1e-6)
    assert torch.equal(agree, dense.argmax(-1) == pruned.argmax(-1))


def test_truncated_kl_is_a_lower_bound_that_tightens_with_k():
    dense, pruned = _logits(2), _logits(3)
    exact = _exact_kl(dense, pruned)
    previous = torch.zeros_like(exact)
    for k in (1, 5, 20, 49):
        kl, agree = token_kl_and_top1(summarize_dense(dense, k=k), pruned)
        assert (kl <= exact * (1 + 1e-5) + 1e-6).all()  # log-softmax in float32
        assert (kl >= previous * (1 - 1e-5) - 1e-6).all()  # a finer partition never loses divergence
        assert torch.equal(agree, dense.argmax(-1) == pruned.argmax(-1))  # exact at any k
        previous = kl


def test_identical_models_have_zero_kl_and_full_agreement():
    dense = _logits(4)
    kl, agree = token_kl_and_top1(summarize_dense(dense, k=8), dense.clone())
    assert kl.abs().max() < 1e-6 and agree.all()


def test_chunking_changes_nothing():
    dense, pruned = _logits(5, (2, 33, 40)), _logits(6, (2, 33, 40))
    whole = token_kl_and_top1(summarize_dense(dense, 10, chunk_tokens=10_000), pruned, chunk_tokens=10_000)
    pieces = token_kl_and_top1(summarize_dense(dense, 10, chunk_tokens=7, width=3), pruned, chunk_tokens=5, width=6)
    torch.testing.assert_close(whole[0], pieces[0], rtol=1e-5, atol=1e-6)  # float32 block sums
    assert torch.equal(whole[1], pieces[1])


def test_window_summaries_and_the_histogram_quantile():
    dense, pruned = _logits(7, (4, 100, 30)), _logits(8, (4, 100, 30))
    rows = window_summaries(summarize_dense(dense, 30), pruned)
    exact = _exact_kl(dense, pruned)
    assert [r["n_tokens"] for r in rows] == [100] * 4
    for w, r in enumerate(rows):
        assert abs(r["kl_sum"] - float(exact[w].sum())) < 1e-3
        assert sum(r["kl_log10_hist"]) == 100 and r["dense_tail_mass"] == 0.0
    merged = [sum(col) for col in zip(*(r["kl_log10_hist"] for r in rows))]
    p99 = histogram_quantile(merged, 0.99)
    true = float(exact.flatten().quantile(0.99))
    assert true <= p99 <= true * 10 ** 0.05 + 1e-12  # the upper edge of the true value's bin
    assert log10_histogram(torch.tensor([0.0, 1e-12]))[0] == 2


def test_blocked_scan_is_the_full_row_computation():
    """Vocabulary blocks of any width: log-sum-exp, NLL, argmax (first maximum on ties), top-k and
    the exactly summed mass outside given ids all equal the whole-row computation."""
    logits = _logits(9, (1, 40, 50)).view(40, 50)
    logits[3, 7] = logits[3, 30] = logits[3].max() + 1.0  # a tie: the first one is the argmax
    targets = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(1))
    ids = logits.topk(5, dim=-1).indices
    full = logits.double()
    for width in (1, 7, 50):
        scan = scan_vocabulary(lambda lo, hi: logits[:, lo:hi], 40, 50, targets=targets, ids=ids, topk=5, width=width)
        torch.testing.assert_close(scan.lse, full.logsumexp(-1))
        torch.testing.assert_close(scan.lse - scan.target, F.cross_entropy(full, targets, reduction="none"))
        assert torch.equal(scan.argmax, logits.argmax(-1)) and int(scan.argmax[3]) == 7
        assert torch.equal(scan.top_ids[:, 0], scan.argmax)  # on a tie too
        torch.testing.assert_close(scan.top_values, logits.topk(5, dim=-1).values)
        assert torch.equal(scan.top_ids.sort(1).values, ids.sort(1).values)
        outside = full.scatter(1, ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(scan.tail, outside)


def test_a_tiny_tail_is_summed_not_subtracted():
    """A dense row with 1e-12 of its mass outside the top 2: 1 - top-k mass would round to 0 in
    float64 arithmetic on float32 exps; the scan keeps it."""
    logits = torch.tensor([[0.0, 0.0, -28.0, -28.0]])
    s = summarize_dense(logits.view(1, 1, 4), k=2)
    exact = math.log(2 * math.exp(-28.0) / (2 + 2 * math.exp(-28.0)))
    assert abs(float(s.tail_logp) - exact) < 1e-5


def test_aggregate_and_sparse_histograms():
    values = torch.tensor([0.0, 1e-3, 1e-3, 2.0])
    counts = log10_histogram(values)
    assert dense_histogram(sparse_histogram(counts)) == counts and len(sparse_histogram(counts)) == 3
    out = aggregate([1.0, 3.0], [5, 7], [sparse_histogram(counts)], window_tokens=10)
    assert out["kl_mean"] == 0.2 and out["top1"] == 0.6
    assert 2.0 <= out["kl_p99"] <= 2.0 * 10 ** 0.05
