"""Seeds as a grid axis: cells per seed, aggregation over seeds, two-level intervals, `compare`."""
from __future__ import annotations

import math

import numpy as np
import pytest

from prunebench.cli.command import main
from prunebench.run.grid import check_seeds, grid_from_dict
from prunebench.errors import UserError
from prunebench.store.records import atomic_write_json, cell_record_path, records_frame
from prunebench.report import uncertainty as u
from prunebench.report.compare import compare_methods
from prunebench.report.build import build_paper_report
from prunebench.report.differences import EVAL_ONLY, NO_SEED_NOISE, SEEDS_AND_EVAL
from prunebench.report.format import EVAL_NOISE_ONLY
from prunebench.report.frame import collapse_duplicate_cells, ok_rows
from prunebench.report.tables.comparisons import comparisons_frame
from prunebench.report.tables.seeds import seeds_frame

T = 63  # predicted tokens per window
TASK = "pb_lee_next_word"


# ----------------------------------------------------------------------------- the grid axis

def _grid(**extra):
    return grid_from_dict({"models": ["tiny:llama"], "methods": ["magnitude", "wanda"], "sparsities": ["0.5"],
                           "calibration": {"dataset": "lee", "n_samples": 2, "seqlen": 32},
                           "eval": {"perplexity": ["lee"], "seqlen": 32, "tasks": []}, **extra})


def test_one_cell_per_seed_for_seed_dependent_methods_only():
    cells = _grid(seeds=[3, 1, 2]).cells()
    assert [(c.method, c.seed) for c in cells] == [("dense", 3), ("magnitude", 3), ("wanda", 3), ("wanda", 1),
                                                   ("wanda", 2)]
    # the calibration draw follows the cell's seed, and the key holds it there
    wanda = [c for c in cells if c.method == "wanda"]
    assert [c.identity()["calibration"]["seed"] for c in wanda] == [3, 1, 2]
    assert len({c.key for c in wanda}) == 3
    # `seed: N` is one seed
    assert [c.seed for c in _grid(seed=5).cells()] == [5, 5, 5]


@pytest.mark.parametrize("seeds,message", [
    ([], "non-empty list"), ([-1], "outside"), ([1.5], "not an integer"), (["x"], "not an integer"),
    ([2 ** 63], "outside"), ([1, 1], "listed twice"), ([True], "not an integer"), ("0,1", "not an integer"),
])
def test_bad_seed_lists_are_refused(seeds, message):
    with pytest.raises(UserError, match=message):
        _grid(seeds=seeds)


def test_calibration_seed_and_both_spellings_are_refused():
    with pytest.raises(UserError, match="calibration.seed is not a setting"):
        grid_from_dict({"models": ["tiny:llama"], "methods": ["wanda"], "calibration": {"seed": 1}})
    with pytest.raises(UserError, match="seeds or seed, not both"):
        _grid(seed=1, seeds=[1])
    assert check_seeds(["0", " 7"]) == [0, 7] and check_seeds(2 ** 63 - 1) == [2 ** 63 - 1]


def test_cli_seeds_list_the_cells(tmp_path, capsys):
    assert main(["run", "--models", "tiny:llama", "--methods", "magnitude,wanda", "--seeds", "0,1,2", "--sparsities", "0.5",
                 "--n-samples", "2", "--seqlen", "32", "--ppl", "lee", "--tasks", "none",
                 "--results", str(tmp_path / "r"), "--dry-run", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[-1].strip() for line in lines] == ["seed 0"] * 3 + ["seed 1", "seed 2"]


# ----------------------------------------------------------------------------- the two-level bootstrap

def _windows(rng, shift, n=40):
    return ((3.4 + shift) * T + 3.0 * rng.standard_normal(n) * math.sqrt(T)).tolist()


def test_one_seed_a_side_is_the_paired_window_bootstrap():
    rng = np.random.default_rng(0)
    a, b = _windows(rng, 0.1), _windows(rng, 0.0)
    assert u.bootstrap_ppl_diff_seeds([a], [b], T) == u.bootstrap_ppl_diff(a, b, T)
    items_a, items_b = "0111010110" * 9, "0101010100" * 9
    assert u.bootstrap_mean_acc_diff_seeds([([items_a], [items_b])]) == u.bootstrap_acc_diff(items_a, items_b)


def test_seed_noise_widens_the_interval_and_can_overturn_a_verdict():
    # The same windows scored by a method whose calibration draw moves it by +-0.03 nats / token
    # per seed, against one whose draws agree: one seed each says "significant", three do not.
    rng = np.random.default_rng(1)
    base = _windows(rng, 0.0)
    noise = lambda: rng.normal(scale=0.3, size=40)  # noqa: E731  per-window evaluation noise
    a = [[x + d * T + e for x, e in zip(base, noise())] for d in (0.03, -0.03, 0.0)]
    b = [[x - 0.005 * T + e for x, e in zip(base, noise())] for _ in range(3)]
    one = u.bootstrap_ppl_diff_seeds(a[:1], b[:1], T)
    three = u.bootstrap_ppl_diff_seeds(a, b, T)
    assert one.significant and not three.significant
    assert (three.hi - three.lo) > 3 * (one.hi - one.lo)
    # the point estimate is the difference of the seed means
    ppl = lambda w: math.exp(sum(w) / (40 * T))  # noqa: E731
    assert three.diff == pytest.approx(np.mean([ppl(w) for w in a]) - np.mean([ppl(w) for w in b]))
    assert u.bootstrap_ppl_diff_seeds(a, b, T) == three  # seeded
    # a real gap far beyond the seed spread stays significant
    far = [[x + 0.3 * T for x in w] for w in a]
    assert u.bootstrap_ppl_diff_seeds(far, b, T).lo > 0


def test_accuracy_over_seeds_and_tasks():
    rng = np.random.default_rng(2)
    truth = rng.random(400) < 0.6
    draw = lambda p: "".join("1" if (t and rng.random() > p) else "0" for t in truth)  # noqa: E731
    a = [draw(0.02), draw(0.05), draw(0.03)]
    b = [draw(0.30)]
    iv = u.bootstrap_mean_acc_diff_seeds([(a, b), (a, b)])
    assert iv.significant and iv.lo > 0 and iv.n == 800
    # tasks from different seed sets cannot be averaged
    assert u.bootstrap_mean_acc_diff_seeds([(a, b), (a[:2], b)]) is None
    assert u.bootstrap_mean_acc_diff_seeds([([a[0][:-1]] + a[1:], b)]) is None  # unequal item counts


# ----------------------------------------------------------------------------- records -> report

def _record(method, label, seed, windows, items, *, seed_dependent=True):
    return {"schema_version": 1, "key": f"{method}-{label}-{seed}", "status": "ok", "seed": seed, "seed_dependent": seed_dependent,
            "model": {"id": "tiny-model"}, "method": {"name": method},
            "sparsity": {"target": None if label == "dense" else float(label), "pattern": "unstructured",
                         "label": label},
            "eval": {"perplexity": {"lee": {"value": math.exp(sum(windows) / (len(windows) * T)), "seqlen": T + 1,
                                            "n_windows": len(windows), "window_tokens": T, "window_nll": windows,
                                            "windows_fingerprint": "abc"}},
                     "zeroshot": {TASK: {"metric": "acc", "value": items.count("1") / len(items), "n": len(items),
                                         "per_item": items, "stderr": 0.02}}}}


@pytest.fixture
def seeded_records():
    rng = np.random.default_rng(3)
    base = _windows(rng, 0.0)
    items = "".join(rng.choice(["0", "1"], size=300, p=[0.3, 0.7]))
    recs = [_record("dense", "dense", 0, base, items, seed_dependent=False),
            _record("magnitude", "0.5", 0, [x + 0.5 * T for x in base], items.replace("1", "0", 60),
                    seed_dependent=False)]
    for seed, (dw, da) in enumerate([(0.10, 0.0), (0.14, 0.0), (0.12, 0.0)]):
        recs.append(_record("wanda", "0.5", seed, [x + dw * T + rng.normal() for x in base],
                            items.replace("1", "0", 20 + seed)))
    for seed, dl in enumerate([0.02, 0.03, 0.025]):
        recs.append(_record("leap", "0.5", seed, [x + dl * T + rng.normal() for x in base],
                            items.replace("1", "0", 5 + seed)))
    return recs


def test_cells_collapse_to_mean_sd_and_per_seed_values(seeded_records):
    frame = collapse_duplicate_cells(ok_rows(records_frame(seeded_records)))
    wanda = frame[frame["method"] == "wanda"].iloc[0]
    values = [r["eval"]["perplexity"]["lee"]["value"] for r in seeded_records if r["method"]["name"] == "wanda"]
    assert wanda["n_seeds"] == 3 and wanda["seeds"] == [0, 1, 2] and wanda["n_records"] == 3
    assert wanda["ppl_lee_per_seed"] == pytest.approx(values)
    assert wanda["ppl_lee"] == pytest.approx(np.mean(values))
    assert wanda["ppl_lee_sd"] == pytest.approx(np.std(values, ddof=1))
    assert len(wanda["window_nll_lee_per_seed"]) == 3
    assert math.isnan(frame[frame["method"] == "dense"].iloc[0]["ppl_lee_sd"])


def test_comparisons_hold_every_pair_with_their_noise(seeded_records):
    comparisons = comparisons_frame(records_frame(seeded_records))
    pairs = {(r.method, r.baseline) for r in comparisons.itertuples()}
    assert pairs == {("magnitude", "dense"), ("wanda", "dense"), ("leap", "dense"), ("wanda", "magnitude"),
                     ("leap", "magnitude"), ("leap", "wanda")}
    row = lambda m, b, metric="ppl_lee": comparisons[(comparisons["method"] == m) & (comparisons["baseline"] == b)  # noqa: E731
                                                     & (comparisons["metric"] == metric)].iloc[0]
    assert row("leap", "wanda")["noise"] == SEEDS_AND_EVAL and row("leap", "wanda")["n_seeds"] == 3
    assert row("magnitude", "dense")["noise"] == NO_SEED_NOISE
    assert row("wanda", "dense")["baseline_n_seeds"] == 1 and row("wanda", "dense")["noise"] == SEEDS_AND_EVAL
    assert row("leap", "wanda")["significant"] and row("leap", "wanda")["hi"] < 0
    # one seed of a seed-dependent method: the interval says it covers evaluation noise only
    single = comparisons_frame(records_frame([r for r in seeded_records if r.get("seed") == 0]))
    one = single[(single["method"] == "leap") & (single["baseline"] == "wanda") & (single["metric"] == "ppl_lee")]
    assert one["noise"].iloc[0] == EVAL_ONLY


def test_report_prints_mean_sd_and_the_seed_table(seeded_records, tmp_path):
    text = build_paper_report(records_frame(seeded_records), tmp_path)
    assert " ± " in text and "sample SD over their 3 seeds" in text
    seeds = seeds_frame(records_frame(seeded_records))
    assert set(seeds["method"]) == {"wanda", "leap"}  # seed-invariant cells have no spread to show
    ppl = seeds[(seeds["method"] == "wanda") & (seeds["metric"] == "ppl_lee")].iloc[0]
    assert ppl["n_seeds"] == 3 and ppl["sd"] > 0 and ppl["eval_half_width"] > 0
    assert (tmp_path / "seeds.md").read_text().startswith("Seed-dependent cells")
    import matplotlib.pyplot as plt

    from prunebench.report import plots

    drawn = []
    real_errorbar = plt.Axes.errorbar
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Axes, "errorbar", lambda self, x, y, yerr=None, **kw: drawn.append((kw.get("label"), yerr))
                      or real_errorbar(self, x, y, yerr=yerr, **kw))
        plots.plot_perplexity_vs_sparsity(records_frame(seeded_records), "tiny-model", tmp_path / "ppl")
    bars = dict(drawn)
    assert bars["Wanda"][0] > 0 and bars["Magnitude"] is None  # SD bars where there are seeds
    single = build_paper_report(records_frame([r for r in seeded_records if r.get("seed") == 0]), tmp_path / "one")
    assert EVAL_NOISE_ONLY.symbol in single and EVAL_NOISE_ONLY.meaning in single


def _results(tmp_path, records):
    for r in records:
        atomic_write_json(cell_record_path(tmp_path, r["model"]["id"], r["method"]["name"], r["sparsity"]["label"],
                                           r["key"]), r)
    return tmp_path


def test_compare_any_two_methods(seeded_records, tmp_path, capsys):
    rows = compare_methods(records_frame(seeded_records), "leap", "wanda", sparsity="0.5")
    assert set(rows["metric"]) == {"ppl_lee", f"acc_{TASK}", "avg_acc"}
    results = _results(tmp_path, seeded_records)
    assert main(["compare", "--results", str(results), "leap", "wanda", "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "leap minus wanda" in out and "| 3 vs 3 " in out and "leap better" in out


@pytest.mark.parametrize("args,message", [
    (["leap", "ria"], "no ok records of method 'ria'"),
    (["leap", "wanda", "--sparsity", "0.6"], "was not run at sparsity '0.6'"),
    (["leap", "leap"], "two different methods"),
    (["leap", "wanda", "--model", "other"], "no records of model"),
])
def test_compare_refuses_in_one_line(seeded_records, tmp_path, capsys, args, message):
    results = _results(tmp_path, seeded_records)
    assert main(["compare", "--results", str(results), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (results / "report").exists()
