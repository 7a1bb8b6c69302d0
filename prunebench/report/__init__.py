"""The reporting layer: run records (a pandas DataFrame) -> tables (markdown, LaTeX, CSV) and
plots (PNG / PDF), plus the LEAP paper's published numbers as reference data.

Accuracy convention: DataFrames hold accuracies as fractions in [0, 1], as the run records do;
rendered tables, plots and gains show percent points with two decimals, as the paper prints them.
"""
from prunebench.report.paper import (
    PAPER_BASELINE,
    PAPER_HEADLINE_GAIN,
    PAPER_MODEL_IDS,
    PAPER_SOURCE,
    PAPER_TASKS,
    SIBLING_STUDY_SOURCE,
    TASK_DISPLAY_NAMES,
    paper_reference_frame,
)
from prunebench.report.plots import (
    plot_accuracy_vs_sparsity,
    plot_perplexity_vs_sparsity,
    plot_task_bars,
    write_plots,
)
from prunebench.report.tables import (
    BEST_LAYERWISE,
    build_paper_report,
    cells_frame,
    gain_table,
    layerwise_methods,
    layout_frame,
    learned_methods,
    paper_layout,
    perplexity_tables,
    render_latex,
    render_markdown,
    summarize_gains,
    write_cells_csv,
)

__all__ = [
    "BEST_LAYERWISE", "PAPER_BASELINE", "layerwise_methods", "learned_methods",
    "PAPER_HEADLINE_GAIN", "PAPER_MODEL_IDS", "PAPER_SOURCE", "PAPER_TASKS", "SIBLING_STUDY_SOURCE",
    "TASK_DISPLAY_NAMES", "build_paper_report", "cells_frame", "gain_table", "layout_frame",
    "paper_layout", "paper_reference_frame", "perplexity_tables", "plot_accuracy_vs_sparsity",
    "plot_perplexity_vs_sparsity", "plot_task_bars", "render_latex", "render_markdown",
    "summarize_gains", "write_cells_csv", "write_plots",
]
