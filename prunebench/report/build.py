"""`prunebench report`: records on disk -> tables and plots under the results directory."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from prunebench.store.records import load_records, records_frame, warn_skipped
from prunebench.store.regeneration import pending_regeneration
from .cost import write_cost_report
from .html import write_html
from .plots import plot_block_allocation, plot_heldout_curves, write_plots
from .tables import build_paper_report, cells_csv_text, paper_layout, paper_reference_frame, render_latex

log = logging.getLogger("prunebench")
REPORT_DIR = "report"


def build_report(results_dir, *, out_dir=None, fmt: str = "md", paper: bool = False) -> str:
    """Write every table and plot; return what `--format` asks to print.

    Record files that are unreadable, not strict JSON or off the schema (prunebench.store.records) are
    named on stderr with their reason and skipped, never fatal: the other records are tabled.
    """
    out = Path(out_dir) if out_dir else Path(results_dir) / REPORT_DIR
    if paper:
        text = build_paper_report(None, out / "paper")
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
