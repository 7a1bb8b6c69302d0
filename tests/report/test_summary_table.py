"""The README's demo table is the committed records' own: README == results/report/summary.md ==
the table the current report code builds from results/records/."""
import re

import pandas as pd

from prunebench.report.build import REPORT_DIR, SUMMARY_MD
from prunebench.report.tables.summary import render_summary_markdown
from prunebench.store.records import load_records, records_frame

from conftest import REPO

BLOCK = re.compile(r"<!-- summary: (\S+) -->\n(.*?)<!-- /summary -->", re.S)


def _readme_blocks():
    return BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8"))


def test_readme_quotes_the_committed_summary_verbatim():
    blocks = _readme_blocks()
    assert blocks, "README.md has no <!-- summary: ... --> block"
    for path, text in blocks:
        assert path == f"results/{REPORT_DIR}/{SUMMARY_MD}"
        assert text == (REPO / path).read_text(encoding="utf-8"), \
            f"README's table differs from {path}: copy it after `prunebench report --results results`"


def test_committed_summary_is_what_the_records_give():
    records, skipped = load_records(REPO / "results")
    assert records and not skipped
    built = render_summary_markdown(records_frame(records))
    committed = (REPO / "results" / REPORT_DIR / SUMMARY_MD).read_text(encoding="utf-8")
    assert built == committed, "results/report/summary.md is stale: run `prunebench report --results results`"


def _record(method, sparsity, seed, ppl, windows, acc_items):
    return {"model": "m", "method": method, "sparsity": sparsity, "sparsity_label": sparsity or "dense",
            "pattern": "unstructured", "status": "ok", "seed": seed, "seed_dependent": method != "dense",
            "ppl_lee": ppl, "window_nll_lee": windows, "window_tokens_lee": 10, "n_windows_lee": len(windows),
            "acc_t": sum(acc_items) / len(acc_items), "per_item_t": "".join(map(str, acc_items)),
            "n_t": len(acc_items), "prune_s": 10.0 + seed, "eval_s": 5.0}


def test_summary_rows_hold_mean_sd_interval_and_seconds_range():
    dense = _record("dense", None, 0, 10.0, [23.0] * 8, [1, 1, 0, 1] * 5)
    pruned = [_record("wanda", 0.5, s, p, [w + s for w in [30.0] * 8], [1, 0, 0, 1] * 5)
              for s, p in enumerate([20.0, 21.0, 22.0])]
    text = render_summary_markdown(pd.DataFrame([dense, *pruned]))
    row = next(line for line in text.splitlines() if line.startswith("| Wanda"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["50%", "3", "21.00 ± 1.00"]
    assert cells[4].startswith("+11.00 [")      # mean over seeds minus dense, with its interval
    assert cells[-2:] == ["10-12", "5"]          # prune seconds over the seeds, eval seconds
