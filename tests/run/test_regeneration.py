"""A results folder being regenerated says so: the declaration is strict, and every report built
from the folder opens with its notice."""
import html

import pytest

from prunebench.errors import UserError
from prunebench.store.regeneration import PENDING_FILE, pending_regeneration


def test_no_file_no_regeneration(tmp_path):
    assert pending_regeneration(tmp_path) is None


def test_a_declaration_names_its_commit_and_reason(tmp_path):
    (tmp_path / PENDING_FILE).write_text("since: 1a2b3c4\nreason: the sequence-start rule in data.py\n")
    pending = pending_regeneration(tmp_path)
    assert (pending.since, pending.reason) == ("1a2b3c4", "the sequence-start rule in data.py")
    assert "before commit 1a2b3c4 (the sequence-start rule in data.py)" in pending.notice()


@pytest.mark.parametrize("text", ["since: 1a2b3c4\n", "reason: x\n", "since: xyz1234\nreason: x\n",
                                  "since: 1a2b3c4\nreason: ''\n", "since: 1a2b3c4\nreason: x\nextra: 1\n",
                                  "since: 1a2b3c4\nreason: [a]\n", "- a\n", "since: 1a2b3c4\nreason: |\n  two\n  lines\n"])
def test_a_malformed_declaration_is_an_error(tmp_path, text):
    (tmp_path / PENDING_FILE).write_text(text)
    with pytest.raises(UserError) as info:
        pending_regeneration(tmp_path)
    assert "\n" not in str(info.value)


def test_the_report_opens_with_the_notice(tmp_path):
    from prunebench.run.grid import grid_from_dict
    from prunebench.report.build import build_report
    from prunebench.run.runner import run_grid

    grid = grid_from_dict({"models": ["tiny:llama"], "methods": ["magnitude"], "sparsities": ["0.5"],
                           "calibration": {"dataset": "lee", "n_samples": 2, "seqlen": 32},
                           "eval": {"perplexity": ["lee"], "seqlen": 32, "tasks": [], "max_ppl_windows": 2}})
    run_grid(grid, tmp_path, progress=False)
    (tmp_path / PENDING_FILE).write_text("since: 1a2b3c4\nreason: a test\n")
    text = build_report(tmp_path)
    notice = pending_regeneration(tmp_path).notice()
    assert f"> {notice}" in text.splitlines()[:4]
    assert (tmp_path / "report" / "main_table.md").read_text().startswith(f"> {notice}")
    assert html.escape(notice) in (tmp_path / "report" / "index.html").read_text()
