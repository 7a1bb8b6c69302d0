"""The dense-relative metrics in the report: per-cell intervals, paired differences, columns."""
import numpy as np
import pandas as pd
import pytest

from prunebench.store.records import records_frame
from prunebench.report.tables import dense_relative as rel
from prunebench.report.compare import compare_methods, render, verdict
from prunebench.report.uncertainty import dense_relative_intervals

WINDOWS, TOKENS = 12, 50


def _side(seed, shift=0.0, agree=40, seeds=1):
    rng = np.random.default_rng(seed)
    kl = [list(rng.gamma(2.0, 1.0, WINDOWS) + shift) for _ in range(seeds)]
    top1 = [list(rng.integers(agree - 3, agree + 3, WINDOWS)) for _ in range(seeds)]
    hist = [[[[100 + int(shift * 10), 45], [120, 5]] for _ in range(WINDOWS)] for _ in range(seeds)]
    return {"kl": kl, "top1": top1, "hist": hist}


def test_intervals_of_a_cell_and_of_a_paired_difference():
    a = _side(0)
    own = dense_relative_intervals(a, None, TOKENS)
    assert own["kl_mean"].lo <= own["kl_mean"].diff <= own["kl_mean"].hi
    assert own["kl_mean"].diff == pytest.approx(sum(a["kl"][0]) / (WINDOWS * TOKENS))
    same = dense_relative_intervals(a, a, TOKENS)
    assert all(same[m].lo == same[m].hi == 0.0 for m in same)  # paired: identical sides never differ
    worse = dense_relative_intervals(_side(0, shift=5.0), a, TOKENS)
    assert worse["kl_mean"].significant and worse["kl_mean"].lo > 0 and worse["kl_p99"].diff > 0
    seeds = dense_relative_intervals(_side(1, seeds=3), _side(2, seeds=2), TOKENS)
    assert seeds is not None and seeds["top1"].n == WINDOWS
    short = {k: [v[:-1] for v in vs] for k, vs in a.items()}
    assert dense_relative_intervals(short, a, TOKENS) is None  # not the same windows: no interval


def _record(method, label, seed, side, fp="w1"):
    kl, top1, hist = side["kl"][0], side["top1"][0], side["hist"][0]
    n = WINDOWS * TOKENS
    return {"schema_version": 1, "key": f"{method}-{label}-{seed}", "status": "ok", "seed": seed,
            "seed_dependent": method != "dense", "model": {"id": "tiny:llama"}, "method": {"name": method},
            "sparsity": {"label": label, "target": 0.0 if label == "dense" else 0.5, "pattern": "unstructured"},
            "eval": {"perplexity": {"lee": {
                "value": 10.0, "seqlen": 51, "n_windows": WINDOWS, "window_tokens": TOKENS, "windows_fingerprint": fp,
                "window_nll": [100.0 + i for i in range(WINDOWS)],
                "dense_relative": {"kl_mean": sum(kl) / n, "kl_p99": 0.5, "top1": sum(top1) / n, "k": 64,
                                   "window_kl": kl, "window_top1": top1, "window_kl_hist": hist}}}}}


def test_report_columns_and_compare_rows():
    records = [_record("wanda", "0.5", 0, _side(3, shift=1.0)), _record("magnitude", "0.5", 0, _side(4, shift=3.0))]
    df = records_frame(records)
    assert {"kl_lee", "kl_p99_lee", "top1_lee", "window_kl_lee", "window_kl_hist_lee"} <= set(df.columns)
    frame = rel.dense_relative_frame(df)
    assert list(frame.columns[:6]) == ["model", "method", "sparsity", "dataset", "k", "n_seeds"]
    wanda = frame[frame["method"] == "wanda"].iloc[0]
    assert wanda["kl_mean_lo"] <= wanda["kl_mean"] <= wanda["kl_mean_hi"] and 0 < wanda["top1"] <= 100
    assert "KL p99" in rel.render_markdown(frame)
    rows = compare_methods(df, "wanda", "magnitude")
    kl = rows[rows["metric"] == "kl_lee"].iloc[0]
    assert kl["unit"] == "nats" and kl["diff"] < 0 and kl["hi"] < 0
    assert verdict(kl).startswith("wanda better")  # a smaller KL is the better one
    assert set(rows["metric"]) >= {"ppl_lee", "kl_lee", "kl_p99_lee", "top1_lee"}
    assert "nats" in render(rows)


def test_cells_on_other_windows_get_no_interval():
    records = [_record("wanda", "0.5", 0, _side(3)), _record("magnitude", "0.5", 0, _side(4), fp="other")]
    rows = compare_methods(records_frame(records), "wanda", "magnitude")
    kl = rows[rows["metric"] == "kl_lee"].iloc[0]
    assert pd.isna(kl["lo"]) and "same windows" in kl["note"]
