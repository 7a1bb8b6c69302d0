"""`prunebench report`: records on disk -> tables and plots under the results directory.

build_paper_report writes the tables (tables/) as markdown, LaTeX and CSV; build_report adds the
plots, the cost report and the HTML page, and returns what `--format` asks to print.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from prunebench.errors import UserError
from prunebench.report.cost import write_cost_report
from prunebench.report.format import csv_text
from prunebench.report.html import write_html
from prunebench.report.paper import paper_reference_frame, reference_paper
from prunebench.report.plots import plot_block_allocation, plot_heldout_curves, write_plots
from prunebench.report.tables import chance
from prunebench.report.tables import dense_relative as dense_relative_table
from prunebench.report.tables.cells import cells_csv_text
from prunebench.report.tables.comparisons import comparisons_frame
from prunebench.report.tables.gains import baseline_name, gain_table, render_gains_latex, render_gains_markdown
from prunebench.report.tables.main_table import paper_layout
from prunebench.report.tables.main_table_text import layout_frame, render_latex, render_markdown
from prunebench.report.tables.perplexity import perplexity_long_frame, perplexity_tables, render_perplexity_markdown
from prunebench.report.tables.published import published_tables_markdown
from prunebench.report.tables.seeds import render_seeds_markdown, seeds_frame
from prunebench.report.tables.summary import render_summary_markdown
from prunebench.store.records import load_records, records_frame, warn_skipped
from prunebench.store.regeneration import pending_regeneration
from prunebench.store.atomic import write_text_atomic

log = logging.getLogger("prunebench")
REPORT_DIR = "report"
PAPER_DIR = "paper"   # under the report folder: `--paper`'s tables of the published numbers alone

MAIN_TABLE_STEM = "main_table"
REPORT_MARKDOWN = "report.md"
GAINS_CSV = "gains.csv"
GAINS_TEX = "gains.tex"
PERPLEXITY_CSV = "perplexity.csv"
CELLS_CSV = "cells.csv"
COMPARISONS_CSV = "comparisons.csv"
DENSE_RELATIVE_CSV = "dense_relative.csv"
DENSE_RELATIVE_MD = "dense_relative.md"
SEEDS_CSV = "seeds.csv"
SEEDS_MD = "seeds.md"
SUMMARY_MD = "summary.md"


def build_paper_report(df: pd.DataFrame | None = None, out_dir: str | os.PathLike | None = None,
                       *, tasks: Sequence[str] | None = None,
                       learned_methods: Sequence[str] | None = None,
                       baseline: str | Sequence[str] | None = None, notice: str | None = None) -> str:
    """The paper's tables as markdown text (opening with `notice`, a quoted line, when given).

    With `df` None, the tables are rebuilt from the paper's published numbers alone (what
    `prunebench report --paper` shows); with records, they table the records with the paper's
    numbers beside every matching cell. `baseline` defaults to the one of the paper's headline
    claim. With `out_dir`, also writes report.md, main_table.md / .tex / .csv, gains.csv / .tex,
    perplexity.csv, cells.csv, comparisons.csv (every difference with its 95% interval, see
    tables/comparisons.py), dense_relative.csv / .md, seeds.csv / .md and summary.md (the README's table) there, each atomically.
    """
    paper = reference_paper()
    paper_only = df is None
    reference = paper_reference_frame()
    frame = reference if paper_only else df
    layout = paper_layout(frame, tasks=tasks, reference=None if paper_only else reference)
    gains = gain_table(frame, learned_methods=learned_methods, baseline=baseline, tasks=tasks)
    # the published headline is the paper's own figure: shown for the paper's comparison only
    headline = (dict(paper.headline_gain) if paper_only
                and tuple(learned_methods or (paper.headline_method,)) == (paper.headline_method,)
                and baseline in (None, paper.headline_baseline) else None)
    ppl = perplexity_tables(frame)

    title = (f"# {paper.name} paper tables, rebuilt from the published numbers of {paper.source}"
             if paper_only else f"# prunebench results in the {paper.name} paper's layout")
    main_markdown = render_markdown(layout)
    if notice:
        main_markdown = f"> {notice}\n\n{main_markdown}"
    sections = [title, "", *([f"> {notice}", ""] if notice else []), "## Main table", "", main_markdown,
                f"## Average-accuracy gain over {baseline_name(baseline)} (points)", "",
                render_gains_markdown(gains, baseline, headline, learned_methods)]
    near = None if paper_only else chance.near_chance_frame(frame)
    if near is not None and not near.empty:
        sections += ["## Tasks near chance", "", chance.render_markdown(near)]
    if ppl:
        sections += ["## Perplexity", "", render_perplexity_markdown(ppl, frame)]
    relative = None if paper_only else dense_relative_table.dense_relative_frame(frame)
    if relative is not None and not relative.empty:
        sections += ["## Distance from the dense model", "", dense_relative_table.render_markdown(relative)]
    if paper_only:
        sections += published_tables_markdown()
    text = "\n".join(sections).rstrip() + "\n"

    if out_dir is not None:
        out = Path(out_dir)
        write_text_atomic(out / REPORT_MARKDOWN, text)
        write_text_atomic(out / f"{MAIN_TABLE_STEM}.md", main_markdown)
        write_text_atomic(out / f"{MAIN_TABLE_STEM}.tex", render_latex(layout))
        write_text_atomic(out / f"{MAIN_TABLE_STEM}.csv", csv_text(layout_frame(layout)))
        write_text_atomic(out / GAINS_CSV, csv_text(gains))
        write_text_atomic(out / GAINS_TEX, render_gains_latex(gains, baseline))
        write_text_atomic(out / PERPLEXITY_CSV, csv_text(perplexity_long_frame(frame)))
        write_text_atomic(out / CELLS_CSV, cells_csv_text(frame))
        write_text_atomic(out / COMPARISONS_CSV, csv_text(comparisons_frame(frame)))
        if relative is not None and not relative.empty:  # only records that carry the metrics
            write_text_atomic(out / DENSE_RELATIVE_CSV, csv_text(relative))
            write_text_atomic(out / DENSE_RELATIVE_MD, dense_relative_table.render_markdown(relative))
        seeds = seeds_frame(frame)
        write_text_atomic(out / SEEDS_CSV, csv_text(seeds))
        write_text_atomic(out / SEEDS_MD, render_seeds_markdown(seeds))
        write_text_atomic(out / SUMMARY_MD, render_summary_markdown(frame))
    return text


def build_report(results_dir, *, out_dir=None, fmt: str = "md", paper: bool = False) -> str:
    """Write every table and plot; return what `--format` asks to print.

    Record files that are unreadable, not strict JSON or off the schema (prunebench.store.records) are
    named on stderr with their reason and skipped, never fatal: the other records are tabled.
    """
    out = Path(out_dir) if out_dir else Path(results_dir) / REPORT_DIR
    if paper:
        text = build_paper_report(None, out / PAPER_DIR)
        if fmt == "csv":
            return cells_csv_text(paper_reference_frame())
        if fmt == "latex":
            return render_latex(paper_layout(paper_reference_frame()))
        return text
    records, skipped = load_records(results_dir)
    warn_skipped(skipped, "not tabled")  # validated on read: a bad file is named, the rest is tabled
    if not records:
        raise UserError(f"no records under {Path(results_dir) / 'records'}",
                        hint="run `prunebench run` first, or pass --results DIR")
    df = records_frame(records)
    pending = pending_regeneration(results_dir)
    notice = pending.notice() if pending else None
    if notice:
        log.warning("%s: %s", results_dir, notice)
    failed = df[df["status"] != "ok"]
    for _, row in failed.iterrows():
        log.warning("failed cell not tabled: %s | %s | %s: %s", row["model"], row["method"], row["sparsity_label"], row["error"])
    if "last_attempt_status" in df.columns:
        kept = df[(df["status"] == "ok") & (df["last_attempt_status"] != "ok")]
        for _, row in kept.iterrows():
            log.warning("last attempt failed, ok record kept and tabled: %s | %s | %s: %s", row["model"], row["method"],
                        row["sparsity_label"], row["last_attempt_error"])
    text = build_paper_report(df, out, notice=notice)
    plots = write_plots(df, out)
    plots += plot_heldout_curves(records, out / "heldout_vs_steps")
    plots += plot_block_allocation(records, out)
    plots += _cost_report(records, out)
    write_html(df, records, out, plots=plots, notice=notice)  # index.html: everything above on one offline page
    log.info("wrote tables and %d plot(s) under %s", len(plots), out)
    if fmt == "csv":
        return cells_csv_text(df)  # "diverged" where a perplexity diverged
    if fmt == "latex":
        return render_latex(paper_layout(df))
    return text


def _cost_report(records, out) -> list:
    """cost.csv / cost.md and the quality-vs-cost plots; a model whose shapes cannot be had here
    (a hub id offline, for a record without a stored cost) skips the cost report with a warning."""
    try:
        _, written = write_cost_report(records, out)
    except Exception as exc:  # the tables and plots above stand without it
        log.warning("no cost report: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return []
    return [p for p in written if p.suffix == ".png"]
