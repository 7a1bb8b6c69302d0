"""The reporting layer: run records (a pandas DataFrame) -> tables (markdown, LaTeX, CSV) and
plots (PNG / PDF) and one HTML page, plus the published papers' numbers as reference data.

    paper.py        the published papers' numbers, read from the data files in published/
    format.py       numbers, markers, footnotes, labels and row order, as every output prints them
    frame.py        the records frame: ok rows, cells, what was measured, one row per cell over seeds
    differences.py  paired differences of two cells with their 95% intervals over seeds and windows
    tables/         one file per table; build.py writes them, plots.py draws, html.py + page/ the page

Accuracy convention: DataFrames hold accuracies as fractions in [0, 1], as the run records do;
rendered tables, plots and gains show percent points with two decimals, as the paper prints them.
"""
from prunebench.report.build import build_paper_report
from prunebench.report.paper import paper_reference_frame, reference_paper
from prunebench.report.plots import (
    plot_accuracy_vs_sparsity,
    plot_perplexity_vs_sparsity,
    plot_task_bars,
    write_plots,
)
from prunebench.report.tables.cells import cells_frame, write_cells_csv
from prunebench.report.tables.gains import BEST_LAYERWISE, gain_table, layerwise_methods, learned_methods, summarize_gains
from prunebench.report.tables.main_table import paper_layout
from prunebench.report.tables.main_table_text import layout_frame, render_latex, render_markdown
from prunebench.report.tables.perplexity import perplexity_tables

__all__ = [
    "BEST_LAYERWISE", "build_paper_report", "cells_frame", "gain_table", "layerwise_methods", "layout_frame",
    "learned_methods", "paper_layout", "paper_reference_frame", "perplexity_tables", "plot_accuracy_vs_sparsity",
    "plot_perplexity_vs_sparsity", "plot_task_bars", "reference_paper", "render_latex", "render_markdown",
    "summarize_gains", "write_cells_csv", "write_plots",
]
