"""The static HTML report (results/report/index.html): built by `prunebench report` from records,
then loaded in a real headless Chromium to check that its JS runs without errors, that sorting
works and that its tables hold what the records say."""
import copy
import json
import re
import shutil

import pandas as pd
import pytest
from conftest import REPO

from prunebench.cli.command import main
from prunebench.store.records import load_records
from prunebench.report import html as report_html
from prunebench.report.page import browser
from prunebench.report.page import records as page_records

COMMITTED_RECORDS = REPO / "results" / "records"

REPRODUCTION_ROWS = [
    {"model": "smollm2-135m", "method": "wanda", "sparsity": "0.5", "metric": "ppl_lee", "fresh": 66.3532,
     "reference": 66.3532, "rel_diff": 0.0, "masks_identical": True, "within_tolerance": True},
    {"model": "smollm2-135m", "method": "leap", "sparsity": "0.5", "metric": "ppl_lee", "fresh": 45.1,
     "reference": 43.67, "rel_diff": 0.0327, "masks_identical": False, "within_tolerance": False},
]

COMPARISONS = pd.DataFrame([
    {"model": "smollm2-135m", "sparsity": "0.5", "method": "wanda", "baseline": "dense", "metric": "ppl_lee",
     "diff": 36.46, "lo": 31.2, "hi": 41.9, "significant": True, "unit": "ppl", "note": None},
    {"model": "smollm2-135m", "sparsity": "0.5", "method": "leap", "baseline": "admm",
     "metric": "acc_pb_lee_next_sentence", "diff": -1.25, "lo": -7.5, "hi": 5.0, "significant": False,
     "unit": "points", "note": None},
    {"model": "smollm2-135m", "sparsity": "0.6", "method": "leap", "baseline": "admm", "metric": "avg_acc",
     "diff": -3.75, "lo": None, "hi": None, "significant": None, "unit": "points",
     "note": "no interval (record has no per-item data)"},
])


def _variant(source: dict, key: str, **changes) -> dict:
    record = copy.deepcopy(source)
    record["key"] = key
    for path, value in changes.items():
        target = record
        *parents, leaf = path.split("__")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return record


def _make_results(root):
    """The committed demo records, plus a failed cell and a cell whose perplexity diverged."""
    records = root / "records"
    records.mkdir(parents=True)
    for path in COMMITTED_RECORDS.glob("*.json"):
        shutil.copy(path, records / path.name)
    wanda = json.loads(next(COMMITTED_RECORDS.glob("smollm2-135m__wanda__0.5__*.json")).read_text())
    failed = _variant(wanda, "f" * 64, status="failed", error="RuntimeError: deliberate failure\ntraceback ...",
                      eval={}, sparsity__achieved=None)
    failed["method"]["name"] = "sparsegpt"
    diverged = _variant(wanda, "d" * 64, sparsity__target=0.9, sparsity__label="0.9", sparsity__achieved=0.9)
    diverged["eval"]["perplexity"]["lee"].update(value=None, diverged=True)
    for record in (failed, diverged):
        name = f"smollm2-135m__{record['method']['name']}__{record['sparsity']['label']}__{record['key'][:12]}.json"
        (records / name).write_text(json.dumps(record))
    (root / "report").mkdir()
    (root / "report" / report_html.REPRODUCTION_JSON).write_text(json.dumps(REPRODUCTION_ROWS))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`prunebench report` on the results above, with comparison intervals available."""
    results = _make_results(tmp_path_factory.mktemp("html") / "results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_html, "default_comparisons", lambda df: COMPARISONS)
        assert main(["report", "--results", str(results)]) == 0
    records, _ = load_records(results)
    page = results / "report" / report_html.HTML_NAME
    return page, records


def _rows(dom: str, table_id: str) -> list[str]:
    table = re.search(rf'<table id="{table_id}".*?</table>', dom, re.S)
    assert table, f"no table #{table_id}"
    return re.findall(r"<tr[ >].*?</tr>", table.group(0).split("<tbody>", 1)[1], re.S)


# ----------------------------------------------------------------------------- the file itself

def test_page_is_self_contained(built):
    page, _ = built
    text = page.read_text(encoding="utf-8")
    # Nothing fetched: no external scripts, stylesheets, images or fonts.
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text)
    assert "<script src" not in text and "@import" not in text and "url(http" not in text
    images = re.findall(r'<img [^>]*src="([^"]{0,30})', text)
    assert len(images) >= 3 and all(src.startswith("data:image/png;base64,") for src in images)


def test_page_holds_every_record_and_section(built):
    page, records = built
    text = page.read_text(encoding="utf-8")
    rows = _rows(text, "cells-table")
    assert len(rows) == len(records) == len(list(COMMITTED_RECORDS.glob("*.json"))) + 2  # + failed, diverged
    keys = re.findall(r'<tr class="cell-row" data-key="([0-9a-f]+)" data-status="(\w+)"', text)
    assert sorted(k for k, _ in keys) == sorted(r["key"] for r in records)
    assert dict(keys)["f" * 64] == "failed" and "deliberate failure" in text
    diverged_row = next(row for row in rows if 'data-key="' + "d" * 64 in row)
    assert "diverged" in diverged_row
    first = next(r for r in records if r.get("calibration"))
    for needle in ("50% sparsity", "60% sparsity", "Average-accuracy gain", "Perplexity",
                   first["env"]["git_sha"][:10], first["calibration"]["fingerprint"], "torch 2.13.0+cpu",
                   first["created_at"][:10]):
        assert needle in text, needle
    # Intervals: the two rows with an interval, the third counted as having none.
    assert len(_rows(text, "intervals-table")) == 2
    assert "1 comparisons without an interval: no interval (record has no per-item data) (1)" in text
    repro = _rows(text, "reproduction-table")
    assert len(repro) == 2 and "1 of 2 rows within tolerance" in text
    assert 'class="bad">no<' in repro[1]
    # One heat map per ok pruned cell: the committed ones but dense, plus the diverged one.
    assert text.count('<div class="heatmap"') == len(list(COMMITTED_RECORDS.glob("*.json")))


def test_missing_intervals_and_reproduction_are_stated(tmp_path, built):
    _, records = built
    from prunebench.store.records import records_frame

    df = records_frame(records)
    page = report_html.write_html(df, records, tmp_path, find_comparisons=False)
    text = page.read_text(encoding="utf-8")
    assert report_html.NO_INTERVALS in text and report_html.NO_REPRODUCTION in text
    # A frame whose rows all lack an interval is "no intervals" too, with the reasons counted.
    (tmp_path / report_html.REPRODUCTION_JSON).write_text("{not json")
    page = report_html.write_html(df, records, tmp_path, comparisons=COMPARISONS.iloc[2:])
    text = page.read_text(encoding="utf-8")
    assert report_html.NO_INTERVALS in text and "1 comparisons without an interval" in text
    assert "reproduction.json could not be read" in text


@pytest.mark.parametrize("name,expected", [
    ("model.layers.3.self_attn.q_proj", ("3", "self_attn.q_proj")),
    ("model.decoder.layers.11.fc1", ("11", "fc1")),
    ("transformer.h.0.attn.c_attn", ("0", "attn.c_attn")),
    ("model.language_model.layers.2.mlp.down_proj", ("2", "mlp.down_proj")),
    ("lm_head", ("other", "lm_head")),
])
def test_linear_names_split_into_block_and_kind(name, expected):
    assert page_records.split_linear_name(name) == expected


def test_sparsity_colors_run_light_to_dark():
    assert page_records.sparsity_color(0) == "#f7fbff" and page_records.sparsity_color(1) == "#08306b"
    assert page_records.sparsity_color(0.5) == "#6baed6" and page_records.sparsity_color(7) == "#08306b"


# ----------------------------------------------------------------------------- in a real browser

@pytest.fixture(scope="module")
def chromium():
    binary = browser.find_chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium, or set PRUNEBENCH_CHROMIUM); "
                    ".ci/run installs it")
    return binary


def test_page_runs_in_headless_chromium(built, chromium, tmp_path):
    page, records = built
    result, dom, console = browser.selftest(page, chromium=chromium)
    assert console == [], console                      # nothing logged to the browser console
    assert result["errors"] == 0
    assert re.search(r'<ul id="js-errors" data-count="0" hidden', dom)
    assert result["rows"] == len(records)
    assert result["sorted_ascending"] and result["sorted_descending"]
    # Descending by achieved sparsity: the 90% cell leads, the failed one (no value) is last.
    assert result["first_key_descending"] == "d" * 64
    keys = re.findall(r'<tr class="cell-row" data-key="([0-9a-f]+)"', dom)
    assert keys[-1] == "f" * 64 and sorted(keys) == sorted(r["key"] for r in records)
    # one per pruned record: the committed ones but dense, plus the diverged cell
    assert result["heatmaps"] == len(list(COMMITTED_RECORDS.glob("*.json"))) and result["heatmap_switch"]
    # At a laptop's width nothing overflows: not the page, not any table.
    # The all-cells provenance table is wide by nature and scrolls inside its own box.
    assert not result["page_overflows"] and [t for t in result["overflowing"] if t != "cells-table"] == []

    png = browser.screenshot(page, tmp_path / "index.png", height=result["page_height"], chromium=chromium)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == browser.SCREENSHOT_WIDTH and height == min(result["page_height"], browser.MAX_SCREENSHOT_HEIGHT)


def test_errors_in_the_page_are_caught_into_the_dom(chromium, tmp_path):
    """The check above can fail: a page whose script throws shows it in #js-errors."""
    page = tmp_path / "broken.html"
    text = report_html.render_html(pd.DataFrame(columns=["model", "method", "status"]), [])
    page.write_text(text.replace("</main>", "</main><script>undefinedFunction();</script>"))
    result, dom, console = browser.selftest(page, chromium=chromium)
    assert result["errors"] == 1 and "undefinedFunction" in dom
    assert any("undefinedFunction" in message for message in console)
