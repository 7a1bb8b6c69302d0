"""Uncertainty on every comparison: the paired bootstrap on synthetic data, what perplexity and
zero-shot results keep for it (per-window NLL, per-item correctness, diverged models as valid
JSON), and how the report renders intervals and diverged cells."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from prunebench.store.records import records_frame
from prunebench.report import uncertainty as u
from prunebench.report.build import build_paper_report
from prunebench.report.tables.cells import cells_csv_text
from prunebench.report.tables.comparisons import comparisons_frame
from prunebench.report.tables.gains import gain_table, render_gains_latex
from prunebench.report.tables.main_table import paper_layout
from prunebench.report.tables.main_table_text import render_latex, render_markdown

T = 63  # predicted tokens per window (seqlen 64)


def _windows(n=40, seed=0, scale=3.0, base=3.4):
    rng = np.random.default_rng(seed)
    return (base * T + scale * rng.standard_normal(n) * math.sqrt(T)).tolist()


# ----------------------------------------------------------------------------- the bootstrap

def test_real_perplexity_shift_is_significant():
    dense = _windows()
    pruned = [x + 0.2 * T + np.random.default_rng(1).normal() for x in dense]  # +0.2 nats / token
    iv = u.bootstrap_ppl_diff(pruned, dense, T)
    assert iv.significant and 0 < iv.lo < iv.diff < iv.hi
    assert iv.diff == pytest.approx(math.exp(sum(pruned) / (40 * T)) - math.exp(sum(dense) / (40 * T)))
    assert iv.rel_diff == pytest.approx(iv.ppl_a / iv.ppl_b - 1) and iv.rel_lo > 0
    assert u.bootstrap_ppl_diff(dense, pruned, T).hi < 0  # the other way round: below zero


def test_identical_inputs_give_a_zero_width_interval():
    dense = _windows()
    iv = u.bootstrap_ppl_diff(dense, list(dense), T)
    assert (iv.diff, iv.lo, iv.hi) == (0.0, 0.0, 0.0) and not iv.significant
    items = "0110100111" * 8
    acc = u.bootstrap_acc_diff(items, items)
    assert (acc.diff, acc.lo, acc.hi) == (0.0, 0.0, 0.0) and not acc.significant


def test_pure_noise_is_mostly_not_significant():
    # Two independent draws of the same model quality, many times: about 5% false positives.
    rng = np.random.default_rng(7)
    ppl_hits = acc_hits = 0
    for trial in range(100):
        a = (3.4 * T + rng.standard_normal(30) * 8).tolist()
        b = (3.4 * T + rng.standard_normal(30) * 8).tolist()
        ppl_hits += u.bootstrap_ppl_diff(a, b, T, n_resamples=400).significant
        ia = "".join(rng.choice(["0", "1"], size=80))
        ib = "".join(rng.choice(["0", "1"], size=80))
        acc_hits += u.bootstrap_acc_diff(ia, ib, n_resamples=400).significant
    assert ppl_hits <= 15 and acc_hits <= 15


def test_real_accuracy_gain_is_significant_and_task_average():
    rng = np.random.default_rng(3)
    base = rng.random(400) < 0.4
    better = base | (rng.random(400) < 0.3)    # right wherever base is, and more
    bits = lambda x: "".join("1" if v else "0" for v in x)  # noqa: E731
    iv = u.bootstrap_acc_diff(bits(better), bits(base))
    assert iv.significant and iv.lo > 0 and iv.diff == pytest.approx(better.mean() - base.mean())
    # The average over tasks: each task resampled within itself, tasks weighted equally.
    small = "1100", "1000"
    avg = u.bootstrap_mean_acc_diff([(bits(better), bits(base)), small])
    assert avg.diff == pytest.approx(((better.mean() - base.mean()) + 0.25) / 2)
    assert avg.n == 404
    assert u.bootstrap_acc_diff([1, 0, 1], [True, False, False]).diff == pytest.approx(1 / 3)


def test_bootstrap_is_seeded():
    a, b = _windows(seed=1), _windows(seed=2)
    assert u.bootstrap_ppl_diff(a, b, T) == u.bootstrap_ppl_diff(a, b, T)
    assert u.bootstrap_ppl_diff(a, b, T, seed=5) != u.bootstrap_ppl_diff(a, b, T)
    assert u.bootstrap_acc_diff("0110" * 20, "1010" * 20) == u.bootstrap_acc_diff("0110" * 20, "1010" * 20)
    assert u.bootstrap_ppl_diff(a, b, T).n_resamples == u.N_RESAMPLES == 2000


def test_mismatched_windows_and_items_are_refused():
    a = _windows(40)
    assert u.bootstrap_ppl_diff(a, a[:39], T) is None
    assert u.bootstrap_ppl_diff(a, a[:-1] + [None], T) is None  # a diverged window
    assert u.bootstrap_acc_diff("0101", "010") is None
    assert u.bootstrap_acc_diff("01x1", "0101") is None
    ra = {"seqlen": 64, "n_windows": 40, "window_tokens": T, "window_nll": a, "windows_fingerprint": "f1"}
    assert u.compare_ppl(ra, dict(ra)) is not None
    for change in ({"seqlen": 128, "window_tokens": 127}, {"windows_fingerprint": "f2"},
                   {"n_windows": 39, "window_nll": a[:39]}, {"diverged": True}):
        other = {**ra, **change}
        assert u.compare_ppl(ra, other) is None
        assert u.ppl_not_comparable(ra, other).startswith("not comparable")
    assert u.ppl_not_comparable(ra, {**ra, "window_nll": None}) == u.NO_ITEM_DATA
    ta = {"metric": "acc", "n": 4, "per_item": "0101"}
    assert u.compare_acc(ta, {"metric": "acc", "n": 5, "per_item": "01011"}) is None
    assert u.compare_acc(ta, {"metric": "acc", "n": 4, "per_item": None}) is None
    assert u.compare_acc({**ta, "per_item_tasks": [["x", 4]]}, {**ta, "per_item_tasks": [["y", 4]]}) is None
    assert u.compare_acc(ta, dict(ta)).diff == 0.0


# ----------------------------------------------------------------------------- what results keep

def _nan_model(model):
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return model


def test_perplexity_keeps_window_nll_and_reports_divergence():
    from prunebench.data.windows import eval_tokens
    from prunebench.evaluate.perplexity import perplexity, perplexity_streamed
    from prunebench.modeling.models import load_tiny

    loaded = load_tiny("llama")
    ids = eval_tokens(loaded.tokenizer, "lee", None)
    plain = perplexity(loaded.model, ids, 64, batch_size=2, progress=False, max_windows=5)
    streamed = perplexity_streamed(loaded.model, ids, 64, progress=False, max_windows=5, chunk_windows=2)
    for r in (plain, streamed):
        assert r["diverged"] is False and r["window_tokens"] == 63 and len(r["window_nll"]) == 5
        assert sum(r["window_nll"]) == pytest.approx(math.log(r["value"]) * r["n_tokens"], rel=1e-6)
        json.dumps(r, allow_nan=False)
    assert streamed["window_nll"] == pytest.approx(plain["window_nll"], rel=1e-5)
    assert streamed["windows_fingerprint"] == plain["windows_fingerprint"]
    assert u.compare_ppl(plain, streamed).lo == pytest.approx(0.0, abs=1e-3)

    _nan_model(loaded.model)
    for r in (perplexity(loaded.model, ids, 64, progress=False, max_windows=3),
              perplexity_streamed(loaded.model, ids, 64, progress=False, max_windows=3)):
        assert r["value"] is None and r["diverged"] is True
        assert r["window_nll"] == [None, None, None]
        json.dumps(r, allow_nan=False)   # valid JSON: no NaN / Infinity anywhere


def test_zeroshot_keeps_per_item_correctness(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    from prunebench.evaluate import zeroshot as zs
    from prunebench.modeling.models import load_tiny

    loaded = load_tiny("llama")
    out = zs.evaluate_zeroshot(loaded.model, loaded.tokenizer, "embedded", limit=6, batch_size=8,
                               output_dir=tmp_path)
    r = out[zs.EMBEDDED_TASK]
    assert r["n"] == 6 and len(r["per_item"]) == 6 and set(r["per_item"]) <= {"0", "1"}
    assert r["per_item"].count("1") / 6 == pytest.approx(r["value"])
    assert "per_item_tasks" not in r     # a single task, not a group
    saved = json.loads((tmp_path / zs.RESULTS_FILE).read_text())
    assert "samples" not in saved and saved["results"][zs.EMBEDDED_TASK]["acc,none"] == r["value"]


def test_summarize_concatenates_group_leaves_in_name_order():
    from prunebench.evaluate import zeroshot as zs

    def samples(bits):
        return [{"doc_id": i, "filter": "none", "acc": float(b)} for i, b in reversed(list(enumerate(bits)))]

    results = {
        "results": {"grp": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
        "n-samples": {"leaf_b": {"effective": 2}, "leaf_a": {"effective": 3}},
        "group_subtasks": {"grp": ["leaf_b", "leaf_a"]},
        "samples": {"leaf_b": samples("10"), "leaf_a": samples("001")},
    }
    r = zs.summarize(results, ["grp"])["grp"]
    assert r["per_item"] == "001" + "10" and r["per_item_tasks"] == [["leaf_a", 3], ["leaf_b", 2]]
    results["samples"]["leaf_a"][0]["acc"] = 0.5  # not a 0/1 metric: no per-item string
    assert "per_item" not in zs.summarize(results, ["grp"])["grp"]


# ----------------------------------------------------------------------------- the report

TASK = "pb_lee_next_sentence"
MODEL = "tiny-model"


def _record(method, sparsity, windows, items, *, ppl=None, diverged=False, key=None):
    label = "dense" if method == "dense" else f"{sparsity:g}"
    value = None if diverged else (ppl if ppl is not None else math.exp(sum(windows) / (len(windows) * T)))
    ppl_result = {"value": value, "diverged": diverged, "seqlen": T + 1, "n_windows": len(windows),
                  "n_tokens": len(windows) * T, "window_tokens": T, "window_nll": windows,
                  "windows_fingerprint": "abc"}
    zs = {"metric": "acc", "value": items.count("1") / len(items), "stderr": 0.05, "n": len(items),
          "per_item": items}
    return {"key": key or f"{method}-{label}", "status": "ok",
            "model": {"id": MODEL, "family": "llama"}, "method": {"name": method},
            "sparsity": {"target": sparsity, "pattern": "unstructured", "label": label, "achieved": sparsity},
            "eval": {"perplexity": {"lee": ppl_result}, "zeroshot": {TASK: zs}}}


@pytest.fixture
def records():
    rng = np.random.default_rng(0)
    dense = _windows(40)
    items = "".join(rng.choice(["0", "1"], size=80, p=[0.4, 0.6]))
    flip = lambda s, k: s.replace("1", "0", k)  # noqa: E731  k fewer right answers
    shifted = lambda d: [x + d * T + rng.normal() * 2 for x in dense]  # noqa: E731
    admm = shifted(0.2)
    leap = [x + (0.5 if i % 2 else -0.5) for i, x in enumerate(admm)]  # same total as ADMM
    return [
        _record("dense", 0.0, dense, items),
        _record("wanda", 0.5, shifted(0.5), flip(items, 20)),
        _record("admm", 0.5, admm, flip(items, 6)),
        _record("leap", 0.5, leap, flip(items, 5)),   # one item more right than ADMM
        _record("magnitude", 0.5, [None] * 40, flip(items, 30), diverged=True),
    ]


def test_report_shows_intervals_and_significance(records, tmp_path):
    df = records_frame(records)
    assert df["window_nll_lee"].map(len).tolist() == [40] * 5 and df["diverged_lee"].tolist() == [False] * 4 + [True]
    text = build_paper_report(df, tmp_path)
    main = text.split("## Main table", 1)[1].split("## Average-accuracy gain", 1)[0]
    wanda = next(line for line in main.splitlines() if "| Wanda" in line)
    assert "[" in wanda and "ⁿˢ" not in wanda.split("|")[3]          # PPL: interval, significant
    comparisons = comparisons_frame(df)
    assert list(comparisons.columns[:9]) == ["model", "sparsity", "method", "baseline", "metric",
                                              "diff", "lo", "hi", "significant"]
    wanda_ppl = comparisons[(comparisons["method"] == "wanda") & (comparisons["metric"] == "ppl_lee")].iloc[0]
    assert wanda_ppl["significant"] and wanda_ppl["lo"] > 0 and wanda_ppl["rel_lo"] > 0
    leap_vs_admm = comparisons[(comparisons["method"] == "leap") & (comparisons["baseline"] == "admm")]
    assert set(leap_vs_admm["metric"]) == {"ppl_lee", f"acc_{TASK}", "avg_acc"}
    assert not leap_vs_admm["significant"].any()       # one item apart: noise
    saved = pd.read_csv(tmp_path / "comparisons.csv")
    assert len(saved) == len(comparisons)

    gains = gain_table(df)
    row = gains.iloc[0]
    assert row["gain"] == pytest.approx(1.25) and row["gain_lo"] <= 0 < row["gain_hi"]
    assert not row["significant"]
    gains_md = text.split("## Average-accuracy gain", 1)[1].split("## Perplexity", 1)[0]
    assert "ⁿˢ" in gains_md and "not significant" in gains_md
    assert r"$^{\mathrm{ns}}$" in render_gains_latex(gains)
    assert {"gain_lo", "gain_hi", "significant", "interval_note"} <= set(pd.read_csv(tmp_path / "gains.csv").columns)
    main_csv = pd.read_csv(tmp_path / "main_table.csv")
    assert {"PPL_diff", "PPL_lo", "PPL_hi", "Avg_diff", "Avg_lo", "Avg_hi"} <= set(main_csv.columns)


def test_old_records_show_no_interval_never_fail(records, tmp_path):
    old = copy.deepcopy(records)
    for r in old:
        for v in r["eval"]["perplexity"].values():
            for k in ("window_nll", "window_tokens", "windows_fingerprint", "diverged"):
                v.pop(k)
        for v in r["eval"]["zeroshot"].values():
            v.pop("per_item")
    old[-1]["eval"]["perplexity"]["lee"]["value"] = math.inf     # what a diverged old record held
    df = records_frame(old)
    assert df["diverged_lee"].tolist() == [False] * 4 + [True]
    text = build_paper_report(df, tmp_path)
    assert "¶" in text and "no interval (record has no per-item data)" in text
    comparisons = comparisons_frame(df)
    assert comparisons["lo"].isna().all() and comparisons["significant"].isna().all()
    assert (comparisons["note"].dropna() != "").all()


def test_diverged_cell_renders_in_markdown_latex_and_csv(records, tmp_path):
    df = records_frame(records)
    assert df.loc[df["method"] == "magnitude", "ppl_lee"].isna().all()    # NaN, never inf, in the frame
    layout = paper_layout(df)
    md = render_markdown(layout)
    magnitude = next(line for line in md.splitlines() if "| Magnitude" in line)
    assert "diverged" in magnitude and "inf" not in md
    assert "diverged" in next(line for line in render_latex(layout).splitlines() if line.startswith(f"{MODEL} & Magnitude"))
    build_paper_report(df, tmp_path)
    for name in ("cells.csv", "main_table.csv", "perplexity.csv"):
        csv = (tmp_path / name).read_text()
        assert "diverged" in csv and "inf" not in csv.lower().replace("interval", ""), name
    assert "diverged" in cells_csv_text(df)
    perplexity = (tmp_path / "report.md").read_text().split("## Perplexity", 1)[1]
    assert "diverged" in next(line for line in perplexity.splitlines() if "| Magnitude" in line)


def test_tile_cells_are_compared_with_2to4_cells_and_sparser_tiles():
    rng = np.random.default_rng(1)
    dense = _windows(40)
    items = "".join(rng.choice(["0", "1"], size=80, p=[0.4, 0.6]))

    def cell(method, label, pattern, target, shift):
        r = _record(method, target, [x + shift * T + rng.normal() for x in dense], items, key=f"{method}-{label}")
        r["sparsity"].update(label=label, pattern=pattern)
        return r

    df = records_frame([_record("dense", 0.0, dense, items), cell("maskllm", "2:4", "2:4", 0.5, 0.4),
                        cell("patch", "hybrid:0.45/64", "dense|2:4 tiles", 0.45, 0.3),
                        cell("patch", "hybrid:0.25/64", "dense|2:4 tiles", 0.25, 0.1)])
    c = comparisons_frame(df)
    c = c[c["metric"] == "ppl_lee"]
    pairs = {(r.method, r.sparsity, r.baseline, r.baseline_sparsity) for r in c.itertuples()}
    assert ("patch", "hybrid:0.45/64", "maskllm", "2:4") in pairs
    assert ("patch", "hybrid:0.25/64", "patch", "hybrid:0.45/64") in pairs
    assert ("patch", "hybrid:0.45/64", "patch", "hybrid:0.25/64") not in pairs  # each pair once
    better = c[(c["sparsity"] == "hybrid:0.25/64") & (c["baseline_sparsity"] == "hybrid:0.45/64")].iloc[0]
    assert better["diff"] < 0 and better["significant"]
