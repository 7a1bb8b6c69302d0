"""The page's sections built from the records frame, as the markdown report prints them: the main
table in the paper's layout, the gains over the headline baseline, perplexity, and the distance
from the dense model."""
from __future__ import annotations

import pandas as pd

from prunebench.report.differences import DENSE_RELATIVE_METRICS
from prunebench.report.format import (dataset_display_name, format_difference, format_number, format_sd,
                                      format_sparsity_label, method_display_name, model_display_name)
from prunebench.report.frame import ok_rows, ppl_seqlens
from prunebench.report.page.markup import escape, finite_number, missing, table, td
from prunebench.report.paper import paper_reference_frame
from prunebench.report.tables import dense_relative as dense_relative_table
from prunebench.report.tables.gains import ALL_SETTINGS, baseline_name, gain_table, learned_methods, summarize_gains
from prunebench.report.tables.main_table import TableCell, paper_layout
from prunebench.report.tables.main_table_text import layout_caption
from prunebench.report.tables.perplexity import perplexity_sds, perplexity_tables


def _layout_cell(cell: TableCell, with_paper: bool) -> str:
    """As the markdown prints it: ours + markers, then (paper) where the paper has the cell, then
    the difference from the dense row where the table computes one."""
    text = escape(format_number(cell.value) + format_sd(cell.sd) + "".join(marker.symbol for marker in cell.markers))
    if with_paper and cell.paper is not None:
        text += f' <span class="paper">({escape(format_number(cell.paper))})</span>'
    if cell.difference is not None and cell.difference.diff is not None:
        text += f'<br><span class="diff">{escape(format_difference(cell.difference))}</span>'
    return text


def main_table_section(df: pd.DataFrame) -> str:
    layout = paper_layout(df, reference=paper_reference_frame())
    parts = [f'<p class="caption">{escape(layout_caption(layout))}</p>']
    headers = [("Model", "text"), ("Method", "text")] + [(c, "num") for c in layout.columns]
    blocks = []
    for block in layout.blocks:
        rows = []
        for row in block.rows:
            method = row.method_name + "".join(m.symbol for m in row.method_markers)
            cells = "".join(td(_layout_cell(row.cells[c], layout.with_paper), css="r")
                            for c in layout.columns)
            rows.append(f"<tr><td>{escape(row.model)}</td><td>{escape(method)}</td>{cells}</tr>")
        blocks.append(f'<div><h3>{escape(block.title)}</h3>{table(headers, rows, css="paper-table")}</div>')
    parts.append(f'<div class="blocks">{"".join(blocks)}</div>')
    if not layout.blocks:
        parts.append('<p class="empty">No ok records to table.</p>')
    if layout.footnotes:
        notes = "".join(f"<li>{escape(((n.marker.symbol + ' ') if n.marker else '') + n.text)}</li>"
                        for n in layout.footnotes)
        parts.append(f'<ul class="footnotes">{notes}</ul>')
    return "".join(parts)


def gains_section(df: pd.DataFrame) -> str:
    gains = gain_table(df)
    baseline = baseline_name(None)
    title = f"<h2 id=\"gains\">Average-accuracy gain over {escape(baseline)} (points)</h2>"
    if gains.empty:
        learned = " or ".join(method_display_name(m) for m in learned_methods())
        return title + f'<p class="empty">No setting has results for both {escape(learned)} and {escape(baseline)}.</p>'
    headers = [("Model", "text"), ("Sparsity", "text"), ("Method", "text"), ("Avg", "num"),
               ("Baseline", "text"), ("Baseline Avg", "num"), ("Gain", "num"), ("95% CI", "num"), ("Basis", "text")]

    def interval(g) -> str:
        lo, hi = finite_number(g.gain_lo), finite_number(g.gain_hi)
        if lo is None or hi is None:
            note = g.interval_note
            return td(escape("-"), css="r", title="" if missing(note) else str(note))
        return td(escape(f"[{format_number(lo)}, {format_number(hi)}]"), css="r")

    rows = [f"<tr><td>{escape(g.model_name)}</td><td>{escape(format_sparsity_label(g.sparsity_label))}</td>"
            f"<td>{escape(method_display_name(g.method))}</td>{td(escape(format_number(g.avg)), css='r')}"
            f"<td>{escape(method_display_name(g.baseline))}</td>{td(escape(format_number(g.baseline_avg)), css='r')}"
            f"{td(escape(f'{g.gain:+.2f}'), css='r')}{interval(g)}<td>{escape(g.basis)}</td></tr>"
            for g in gains.itertuples()]
    lines = []
    summary = summarize_gains(gains)
    for method in summary["method"].unique():
        mine = summary[summary["method"] == method]
        overall = mine[mine["sparsity_label"] == ALL_SETTINGS].iloc[0]
        lines.append(f"<li>{escape(method_display_name(method))} minus {escape(baseline)}: mean "
                     f"{overall['mean_gain']:+.2f} points over {int(overall['n_settings'])} settings</li>")
    return title + table(headers, rows, css="paper-table") + f'<ul class="footnotes">{"".join(lines)}</ul>'


def perplexity_section(df: pd.DataFrame) -> str:
    tables = perplexity_tables(df)
    if not tables:
        return ""
    frame = ok_rows(df)
    parts = ['<h2 id="perplexity">Perplexity</h2>']
    for dataset, ppl_table in tables.items():
        seqlens = ppl_seqlens(frame, dataset)
        window = (", ".join(map(str, seqlens)) + "-token windows") if seqlens else "window length not stated"
        labels = [c for c in ppl_table.columns if c not in ("model", "method")]
        headers = [("Model", "text"), ("Method", "text")] + [(format_sparsity_label(l), "num") for l in labels]
        sds = perplexity_sds(df).get(dataset, {})
        rows = [f"<tr><td>{escape(model_display_name(r['model']))}</td><td>{escape(method_display_name(r['method']))}</td>"
                + "".join(td(escape(format_number(r[l]) + format_sd(sds.get((r['model'], r['method'], l)))),
                             sort=r[l], css="r") for l in labels) + "</tr>"
                for _, r in ppl_table.iterrows()]
        parts.append(f"<h3>{escape(dataset_display_name(dataset))} ({escape(window)})</h3>")
        parts.append(table(headers, rows, css="paper-table"))
    return "".join(parts)


def dense_relative_section(df: pd.DataFrame) -> str:
    frame = dense_relative_table.dense_relative_frame(df)
    if frame.empty:
        return ""
    headers = [("Model", "text"), ("Dataset", "text"), ("Method", "text"), ("Sparsity", "text"), ("Seeds", "num"),
               ("KL mean (nats)", "num"), ("KL p99 (nats)", "num"), ("Top-1 (%)", "num"), ("k", "num")]
    rows = [f"<tr><td>{escape(model_display_name(r['model']))}</td><td>{escape(dataset_display_name(r['dataset']))}</td>"
            f"<td>{escape(method_display_name(r['method']))}</td><td>{escape(format_sparsity_label(r['sparsity']))}</td>"
            + td(escape(str(r["n_seeds"])), sort=r["n_seeds"], css="r")
            + "".join(td(escape(dense_relative_table.format_metric(r[m], r[f"{m}_lo"], r[f"{m}_hi"],
                                                                   0 if m == "top1" else 3)), sort=r[m], css="r")
                      for m in DENSE_RELATIVE_METRICS)
            + td(escape(str(r["k"])), sort=r["k"], css="r") + "</tr>"
            for _, r in frame.iterrows()]
    return ('<h2 id="dense-relative">Distance from the dense model</h2>'
            f"<p>{escape(dense_relative_table.CAPTION)}</p>" + table(headers, rows, css="paper-table", sortable=True))
