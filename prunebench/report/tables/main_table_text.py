"""The main table (main_table.py's PaperLayout) as text: github markdown, one booktabs LaTeX
table, and a flat frame for CSV with values rounded as printed."""
from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate

from prunebench.report.format import (DIFFERENCE_CAPTION, DIVERGED, Footnote, dataset_display_name,
                                      difference_columns, footnote_line, format_difference, format_number,
                                      format_sd, latex_escape, round_printed)
from prunebench.report.paper import reference_paper
from prunebench.report.tables.main_table import AVG_COLUMN, PPL_COLUMN, PaperLayout, TableBlock, TableCell

SEEDS_CAPTION = ("Cells that depend on the calibration seed show the mean ± sample SD over their {n} seeds "
                 "(seed-invariant cells, such as dense and magnitude, run once).")


def _format_cell(cell: TableCell, with_paper: bool, latex: bool = False) -> str:
    text = format_number(cell.value) + format_sd(cell.sd, latex)
    text += "".join(marker.latex if latex else marker.symbol for marker in cell.markers)
    if with_paper and cell.paper is not None:
        text += f" ({format_number(cell.paper)})"
    if cell.difference is not None and cell.difference.diff is not None:
        text += " " + format_difference(cell.difference, latex)
    return text


def _ppl_description(layout: PaperLayout) -> str:
    if layout.ppl_dataset is None:
        return "no perplexity measured"
    window = (", ".join(str(length) for length in layout.ppl_seqlens) + "-token windows"
              if layout.ppl_seqlens else "window length not stated")
    return f"PPL: {dataset_display_name(layout.ppl_dataset)} ({window})"


def layout_caption(layout: PaperLayout) -> str:
    caption = f"{_ppl_description(layout)}; accuracies in percent; Avg = plain mean of the task cells."
    if layout.with_paper:
        paper_dataset = reference_paper().ppl_dataset
        caption += " Cells read ours (paper) where the paper published the same model, method and sparsity"
        if layout.ppl_dataset != paper_dataset:
            caption += f" (paper perplexities are {paper_dataset}, so PPL has none here)"
        caption += "."
    seeds = sorted({row.n_seeds for block in layout.blocks for row in block.rows if row.n_seeds > 1})
    if seeds:
        caption += f" {SEEDS_CAPTION.format(n='/'.join(map(str, seeds)))}"
    if layout.with_differences:
        caption += (" " + DIFFERENCE_CAPTION.format(what="PPL and Avg cells", baseline="the dense row of the same model"))
    return caption


def _block_rows(block: TableBlock, layout: PaperLayout, latex: bool = False) -> list[list[str]]:
    escape = latex_escape if latex else (lambda text: text)
    rows = []
    for row in block.rows:
        method = escape(row.method_name) + "".join(
            marker.latex if latex else marker.symbol for marker in row.method_markers)
        rows.append([escape(row.model), method] + [
            _format_cell(row.cells[column], layout.with_paper, latex) for column in layout.columns])
    return rows


def render_markdown(layout: PaperLayout, heading_level: int = 3) -> str:
    """The layout as github markdown: one table per sparsity block, then the footnotes."""
    headers = ["Model", "Method"] + layout.columns
    parts = [layout_caption(layout), ""]
    for block in layout.blocks:
        parts.append(f"{'#' * heading_level} {block.title}")
        parts.append("")
        parts.append(tabulate(_block_rows(block, layout), headers=headers, tablefmt="github",
                              disable_numparse=True,
                              colalign=["left", "left"] + ["right"] * len(layout.columns)))
        parts.append("")
    if not layout.blocks:
        parts.append("No ok records to table.")
        parts.append("")
    for note in layout.footnotes:
        parts.append(f"- {footnote_line(note)}")
    return "\n".join(parts).rstrip() + "\n"


def render_latex(layout: PaperLayout) -> str:
    """The layout as one booktabs table, sparsity blocks separated by a spanning header."""
    n_columns = 2 + len(layout.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(layout_caption(layout))}}}",
             r"\begin{tabular}{ll" + "r" * len(layout.columns) + "}", r"\toprule",
             " & ".join(["Model", "Method"] + [latex_escape(c) for c in layout.columns]) + r" \\"]
    for block in layout.blocks:
        lines.append(r"\midrule")
        lines.append(rf"\multicolumn{{{n_columns}}}{{c}}{{{latex_escape(block.title)}}} \\")
        lines.append(r"\midrule")
        for cells in _block_rows(block, layout, latex=True):
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in layout.footnotes:
        lines.append(r"\par\footnotesize " + _latex_escape_footnote(note))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _latex_escape_footnote(note: Footnote) -> str:
    text = latex_escape(note.text)
    return f"{note.marker.latex} {text}" if note.marker else text


def _csv_number(value: float | None):
    """As printed: rounded, "diverged" for a diverged perplexity, None when missing."""
    if value is None:
        return None
    return DIVERGED if math.isinf(value) else round_printed(value)


def layout_frame(layout: PaperLayout) -> pd.DataFrame:
    """The layout as a flat table for CSV: one row per printed row, values rounded as printed
    (percent points for accuracies), markers in `avg_flags` / `method_flags`, and `paper_<column>`
    beside every column when the layout carries paper values."""
    records = []
    for block in layout.blocks:
        for row in block.rows:
            record = {"sparsity_label": block.sparsity_label, "model": row.model_id,
                      "model_name": row.model, "method": row.method, "source": row.source}
            for column in layout.columns:
                cell = row.cells[column]
                record[column] = _csv_number(cell.value)
                if layout.with_paper:
                    record[f"paper_{column}"] = None if cell.paper is None else round_printed(cell.paper)
                if layout.with_differences and column in (PPL_COLUMN, AVG_COLUMN):
                    record.update(difference_columns(column, cell.difference))
            record["avg_flags"] = "".join(m.symbol for m in row.cells[AVG_COLUMN].markers)
            record["method_flags"] = "".join(m.symbol for m in row.method_markers)
            records.append(record)
    return pd.DataFrame(records)
