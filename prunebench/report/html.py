"""The report as one static page, results/report/index.html.

Everything is inline (the stylesheet and a little vanilla JS for sorting tables and switching the
heat map, both package data in report/page/, and plots as base64 PNG data URIs), so the file
opens offline by double-click and can be mailed or archived alone. The sections come from
report/page/; report/page/browser.py loads the page in a headless Chromium to check it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from prunebench.report.page.intervals import NO_INTERVALS, comparisons_section
from prunebench.report.page.markup import asset, escape
from prunebench.report.page.records import cells_section, heatmap_section, plots_section
from prunebench.report.page.reproduction import (NO_REPRODUCTION, REPRODUCTION_JSON, read_reproduction,
                                                 reproduction_section)
from prunebench.report.page.results import dense_relative_section, gains_section, main_table_section, perplexity_section
from prunebench.report.paper import reference_paper
from prunebench.report.tables.comparisons import comparisons_frame
from prunebench.store.atomic import write_text_atomic

__all__ = ["HTML_NAME", "NO_INTERVALS", "NO_REPRODUCTION", "REPRODUCTION_JSON", "default_comparisons",
           "render_html", "write_html"]

log = logging.getLogger("prunebench")

HTML_NAME = "index.html"
STYLESHEET = "page.css"
ERROR_TRAP_SCRIPT = "error_trap.js"   # first script in <head>: later errors, its own too, land in the DOM
PAGE_SCRIPT = "page.js"               # sorting, the heat map switch and the #selftest hook


def default_comparisons(df: pd.DataFrame) -> pd.DataFrame | None:
    """Every comparison with its interval (tables/comparisons.py); if that fails, the page goes
    without them (logged) rather than not at all."""
    try:
        return comparisons_frame(df)
    except Exception as exc:
        log.warning("html report: comparisons_frame failed: %s", exc)
        return None


def render_html(df: pd.DataFrame, records: Sequence[dict], *, plots: Sequence[str | os.PathLike] = (),
                comparisons: pd.DataFrame | None = None, reproduction: list[dict] | None = None,
                reproduction_problem: str | None = None, title: str = "prunebench report",
                notice: str | None = None) -> str:
    """The whole page as one string (nothing referenced outside it); `notice` opens it."""
    n_ok = sum(1 for r in records if r.get("status") == "ok")
    # The records' own dates, not the build time: rebuilding from the same records gives the same file.
    dates = sorted(str(r["created_at"])[:10] for r in records if r.get("created_at"))
    span = (f" · run {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")) if dates else ""
    sections = [
        f'<h2 id="main">Main table (the {escape(reference_paper().name)} paper\'s layout)</h2>', main_table_section(df),
        gains_section(df), perplexity_section(df), dense_relative_section(df), comparisons_section(comparisons),
        reproduction_section(reproduction, reproduction_problem), plots_section(plots),
        cells_section(records), heatmap_section(records),
    ]
    nav = "".join(f'<a href="#{anchor}">{escape(text)}</a>' for anchor, text in (
        ("main", "Main table"), ("gains", "Gains"), ("perplexity", "Perplexity"), ("dense-relative", "KL / top-1"),
        ("intervals", "95% intervals"), ("reproduction", "Reproduction"), ("plots", "Plots"),
        ("cells", "All cells"), ("per-layer", "Per-layer sparsity")))
    # Each inlined asset opens on its own line after its tag, as the files are written.
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No favicon request: a file:// page asking for one logs a console error in some browsers.
        '<link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><script>\n{asset(ERROR_TRAP_SCRIPT)}</script>"
        f"<style>\n{asset(STYLESHEET)}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p>{len(records)} records ({n_ok} ok, {len(records) - n_ok} not ok)"
        f"{span} · accuracies in percent</p>"
        + (f'<p class="notice" role="alert">{escape(notice)}</p>' if notice else "") + "</header>"
        '<ul id="js-errors" data-count="0" hidden></ul>'
        f"<nav>{nav}</nav><main>{''.join(sections)}</main><script>\n{asset(PAGE_SCRIPT)}</script></body></html>\n")


def write_html(df: pd.DataFrame, records: Sequence[dict], out_dir: str | os.PathLike, *,
               plots: Sequence[str | os.PathLike] = (), comparisons: pd.DataFrame | None = None,
               find_comparisons: bool = True, notice: str | None = None) -> Path:
    """Write out_dir/index.html (atomically) from the records frame, the records themselves, the
    plot files and, when present, the comparison intervals and out_dir/reproduction.json."""
    out = Path(out_dir)
    if comparisons is None and find_comparisons:
        comparisons = default_comparisons(df)
    reproduction, problem = read_reproduction(out)
    if problem:
        log.warning("html report: %s", problem)
    records = [r for r in records if isinstance(r, dict)]
    page = render_html(df, records, plots=plots, comparisons=comparisons, reproduction=reproduction,
                       reproduction_problem=problem, notice=notice)
    return write_text_atomic(out / HTML_NAME, page)
