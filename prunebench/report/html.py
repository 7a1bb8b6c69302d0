"""The report as one static page, results/report/index.html.

Everything is inline (CSS, a little vanilla JS for sorting tables and switching the heat map,
plots as base64 PNG data URIs), so the file opens offline by double-click and can be mailed or
archived alone. Opened with `#selftest` in the URL, the page exercises its own JS and writes the
outcome into the DOM: that is how the headless-browser test (and `screenshot`, which reads the
page height from it) looks inside without a driver library.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from prunebench.store.atomic import write_text_atomic
from prunebench.report.differences import DENSE_RELATIVE_METRICS, EVAL_ONLY
from prunebench.report.format import (EVAL_NOISE_ONLY, dataset_display_name, format_difference, format_number,
                                      format_sd, format_sparsity_label, method_display_name, method_order,
                                      model_display_name, model_order, sparsity_label_order, task_display_name)
from prunebench.report.frame import ok_rows, ppl_seqlens
from prunebench.report.paper import PERCENT, paper_reference_frame, reference_paper
from prunebench.report.tables import dense_relative as rel
from prunebench.report.tables.comparisons import comparisons_frame
from prunebench.report.tables.gains import baseline_name, gain_table, learned_methods, summarize_gains
from prunebench.report.tables.main_table import paper_layout
from prunebench.report.tables.main_table_text import layout_caption
from prunebench.report.tables.perplexity import perplexity_sds, perplexity_tables

log = logging.getLogger("prunebench")

HTML_NAME = "index.html"
SCREENSHOT_NAME = "index.png"
REPRODUCTION_JSON = "reproduction.json"
COMPARISON_COLUMNS = ["model", "sparsity", "method", "baseline", "metric", "diff", "lo", "hi",
                      "significant", "n_seeds", "baseline_n_seeds", "noise"]
NO_INTERVALS = "no intervals available"
NO_REPRODUCTION = "no reproduction run"
SCREENSHOT_WIDTH = 1280
# Chromium refuses (or renders blank) beyond roughly this many pixels in one capture.
MAX_SCREENSHOT_HEIGHT = 16000
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ENV = "PRUNEBENCH_CHROMIUM"


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _num(value, digits: int = 4) -> str:
    """Significant digits, not decimals: differences and ratios span many magnitudes."""
    if _missing(value):
        return "-"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def _sort_value(value) -> str:
    return "" if _missing(value) else str(value)


def _table(headers: Sequence[tuple[str, str]], rows: Iterable[str], *, table_id: str = "",
           css: str = "", sortable: bool = False) -> str:
    """headers: (label, "num" | "text"); rows: pre-rendered <tr> strings."""
    classes = " ".join(c for c in (css, "sortable" if sortable else "") if c)
    head = "".join(f'<th data-type="{kind}" scope="col"{" tabindex=0" if sortable else ""}>'
                   f'{_e(label).replace("_", "_<wbr>")}</th>'
                   for label, kind in headers)
    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{classes}"' if classes else "")
    return (f'<div class="scroll"><table{attrs}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _td(text: str, sort=None, css: str = "", title: str = "") -> str:
    """`text` is already escaped HTML; `sort` is the raw value the JS sorts on."""
    attrs = ""
    if sort is not None:
        attrs += f' data-v="{_e(_sort_value(sort))}"'
    if css:
        attrs += f' class="{css}"'
    if title:
        attrs += f' title="{_e(title)}"'
    return f"<td{attrs}>{text}</td>"


# ----------------------------------------------------------------------------- paper-layout tables

def _layout_cell(cell, with_paper: bool) -> str:
    """As the markdown prints it: ours + markers, then (paper) where the paper has the cell."""
    text = _e(format_number(cell.value) + format_sd(getattr(cell, "sd", None))
              + "".join(marker.symbol for marker in cell.markers))
    if with_paper and cell.paper is not None:
        text += f' <span class="paper">({_e(format_number(cell.paper))})</span>'
    # The difference from the dense row, where the table computes one.
    if cell.difference is not None and cell.difference.diff is not None:
        text += f'<br><span class="diff">{_e(format_difference(cell.difference))}</span>'
    return text


def _main_table_section(df: pd.DataFrame) -> str:
    layout = paper_layout(df, reference=paper_reference_frame())
    parts = [f'<p class="caption">{_e(layout_caption(layout))}</p>']
    headers = [("Model", "text"), ("Method", "text")] + [(c, "num") for c in layout.columns]
    blocks = []
    for block in layout.blocks:
        rows = []
        for row in block.rows:
            method = row.method_name + "".join(m.symbol for m in row.method_markers)
            cells = "".join(_td(_layout_cell(row.cells[c], layout.with_paper), css="r")
                            for c in layout.columns)
            rows.append(f"<tr><td>{_e(row.model)}</td><td>{_e(method)}</td>{cells}</tr>")
        blocks.append(f'<div><h3>{_e(block.title)}</h3>{_table(headers, rows, css="paper-table")}</div>')
    parts.append(f'<div class="blocks">{"".join(blocks)}</div>')
    if not layout.blocks:
        parts.append('<p class="empty">No ok records to table.</p>')
    if layout.footnotes:
        notes = "".join(f"<li>{_e(((n.marker.symbol + ' ') if n.marker else '') + n.text)}</li>"
                        for n in layout.footnotes)
        parts.append(f'<ul class="footnotes">{notes}</ul>')
    return "".join(parts)


def _gains_section(df: pd.DataFrame) -> str:
    gains = gain_table(df)
    baseline = baseline_name(None)
    title = f"<h2 id=\"gains\">Average-accuracy gain over {_e(baseline)} (points)</h2>"
    if gains.empty:
        learned = " or ".join(method_display_name(m) for m in learned_methods())
        return title + f'<p class="empty">No setting has results for both {_e(learned)} and {_e(baseline)}.</p>'
    with_ci = "gain_lo" in gains.columns
    headers = ([("Model", "text"), ("Sparsity", "text"), ("Method", "text"), ("Avg", "num"),
                ("Baseline", "text"), ("Baseline Avg", "num"), ("Gain", "num")]
               + ([("95% CI", "num")] if with_ci else []) + [("Basis", "text")])

    def interval(g) -> str:
        lo, hi = _finite_number(getattr(g, "gain_lo", None)), _finite_number(getattr(g, "gain_hi", None))
        if lo is None or hi is None:
            note = getattr(g, "interval_note", None)
            return _td(_e("-"), css="r", title="" if _missing(note) else str(note))
        return _td(_e(f"[{format_number(lo)}, {format_number(hi)}]"), css="r")

    rows = [f"<tr><td>{_e(g.model_name)}</td><td>{_e(format_sparsity_label(g.sparsity_label))}</td>"
            f"<td>{_e(method_display_name(g.method))}</td>{_td(_e(format_number(g.avg)), css='r')}"
            f"<td>{_e(method_display_name(g.baseline))}</td>{_td(_e(format_number(g.baseline_avg)), css='r')}"
            f"{_td(_e(f'{g.gain:+.2f}'), css='r')}{interval(g) if with_ci else ''}<td>{_e(g.basis)}</td></tr>"
            for g in gains.itertuples()]
    lines = []
    summary = summarize_gains(gains)
    for method in summary["method"].unique():
        mine = summary[summary["method"] == method]
        overall = mine[mine["sparsity_label"] == "all"].iloc[0]
        lines.append(f"<li>{_e(method_display_name(method))} minus {_e(baseline)}: mean "
                     f"{overall['mean_gain']:+.2f} points over {int(overall['n_settings'])} settings</li>")
    return title + _table(headers, rows, css="paper-table") + f'<ul class="footnotes">{"".join(lines)}</ul>'


def _perplexity_section(df: pd.DataFrame) -> str:
    tables = perplexity_tables(df)
    if not tables:
        return ""
    frame = ok_rows(df)
    parts = ['<h2 id="perplexity">Perplexity</h2>']
    for dataset, table in tables.items():
        seqlens = ppl_seqlens(frame, dataset)
        window = (", ".join(map(str, seqlens)) + "-token windows") if seqlens else "window length not stated"
        labels = [c for c in table.columns if c not in ("model", "method")]
        headers = [("Model", "text"), ("Method", "text")] + [(format_sparsity_label(l), "num") for l in labels]
        sds = perplexity_sds(df).get(dataset, {})
        rows = [f"<tr><td>{_e(model_display_name(r['model']))}</td><td>{_e(method_display_name(r['method']))}</td>"
                + "".join(_td(_e(format_number(r[l]) + format_sd(sds.get((r['model'], r['method'], l)))),
                              sort=r[l], css="r") for l in labels) + "</tr>"
                for _, r in table.iterrows()]
        parts.append(f"<h3>{_e(dataset_display_name(dataset))} ({_e(window)})</h3>")
        parts.append(_table(headers, rows, css="paper-table"))
    return "".join(parts)


def _dense_relative_section(df: pd.DataFrame) -> str:
    frame = rel.dense_relative_frame(df)
    if frame.empty:
        return ""
    headers = [("Model", "text"), ("Dataset", "text"), ("Method", "text"), ("Sparsity", "text"), ("Seeds", "num"),
               ("KL mean (nats)", "num"), ("KL p99 (nats)", "num"), ("Top-1 (%)", "num"), ("k", "num")]
    rows = [f"<tr><td>{_e(model_display_name(r['model']))}</td><td>{_e(dataset_display_name(r['dataset']))}</td>"
            f"<td>{_e(method_display_name(r['method']))}</td><td>{_e(format_sparsity_label(r['sparsity']))}</td>"
            + _td(_e(str(r["n_seeds"])), sort=r["n_seeds"], css="r")
            + "".join(_td(_e(rel.format_metric(r[m], r[f"{m}_lo"], r[f"{m}_hi"], 0 if m == "top1" else 3)), sort=r[m], css="r")
                      for m in DENSE_RELATIVE_METRICS)
            + _td(_e(str(r["k"])), sort=r["k"], css="r") + "</tr>"
            for _, r in frame.iterrows()]
    return ('<h2 id="dense-relative">Distance from the dense model</h2>'
            f"<p>{_e(rel.CAPTION)}</p>" + _table(headers, rows, css="paper-table", sortable=True))


# ----------------------------------------------------------------------------- comparisons (95% CIs)

def default_comparisons(df: pd.DataFrame) -> pd.DataFrame | None:
    """Every comparison with its interval (tables/comparisons.py); if that fails, the page goes
    without them (logged) rather than not at all."""
    try:
        return comparisons_frame(df)
    except Exception as exc:
        log.warning("html report: comparisons_frame failed: %s", exc)
        return None


def _interval_svg(lo: float, hi: float, diff: float, left: float, right: float, significant: bool) -> str:
    width, height, pad = 160, 14, 4
    span = (right - left) or 1.0

    def x(value: float) -> float:
        return pad + (value - left) / span * (width - 2 * pad)

    color = "#c0392b" if significant else "#7f8c8d"
    return (f'<svg class="ci" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="interval">'
            f'<line x1="{x(0):.1f}" y1="0" x2="{x(0):.1f}" y2="{height}" stroke="#999" stroke-dasharray="2,2"/>'
            f'<line x1="{x(lo):.1f}" y1="{height / 2}" x2="{x(hi):.1f}" y2="{height / 2}" stroke="{color}" stroke-width="2"/>'
            f'<circle cx="{x(diff):.1f}" cy="{height / 2}" r="3" fill="{color}"/></svg>')


def _truthy(value) -> bool | None:
    if _missing(value):
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value)


def _finite_number(value) -> float | None:
    number = pd.to_numeric(value, errors="coerce")
    return None if _missing(number) or not math.isfinite(number) else float(number)


def _significance_text(label: str, row) -> str:
    """"yes (3 vs 3)": the verdict and the seeds behind the method and the baseline, with the
    evaluation-only marker when a seed-dependent side has one seed."""
    a, b = row.n_seeds, row.baseline_n_seeds
    text = label if _missing(a) or _missing(b) else f"{label} ({int(a)} vs {int(b)})"
    return text + (EVAL_NOISE_ONLY.symbol if row.noise == EVAL_ONLY else "")


def _noise_text(row) -> str:
    return "" if _missing(row.noise) else f"the interval covers: {row.noise}"


def _comparisons_section(comparisons: pd.DataFrame | None) -> str:
    title = '<h2 id="intervals">Comparisons: 95% intervals</h2>'
    if comparisons is None or not isinstance(comparisons, pd.DataFrame) or comparisons.empty:
        return title + f'<p class="empty" id="no-intervals">{NO_INTERVALS}</p>'
    frame = comparisons.copy()
    for column in COMPARISON_COLUMNS + ["note", "unit"]:
        if column not in frame.columns:
            frame[column] = None
    bounded = frame["lo"].map(_finite_number).notna() & frame["hi"].map(_finite_number).notna()
    # Rows without an interval would fill the table with dashes: count them by reason instead.
    reasons = frame.loc[~bounded, "note"].map(lambda n: "no interval" if _missing(n) or not n else str(n))
    without = ""
    if len(reasons):
        counts = ", ".join(f"{_e(reason)} ({count})" for reason, count in reasons.value_counts().items())
        without = f'<p class="caption" id="intervals-missing">{len(reasons)} comparisons without an interval: {counts}.</p>'
    frame = frame[bounded]
    if frame.empty:
        return title + f'<p class="empty" id="no-intervals">{NO_INTERVALS}</p>' + without
    # One horizontal scale per metric: perplexity and accuracy differences do not share units.
    scales = {}
    for metric, group in frame.groupby("metric", dropna=False, sort=False):
        values = [v for v in map(_finite_number, pd.concat([group["lo"], group["hi"], group["diff"]]))
                  if v is not None]
        scales[metric] = (min([0.0] + values), max([0.0] + values))
    headers = [("Model", "text"), ("Sparsity", "num"), ("Method", "text"), ("Baseline", "text"),
               ("Metric", "text"), ("Diff", "num"), ("95% interval", "num"), ("vs 0", "num"),
               ("Significant (seeds)", "text")]
    rows = []
    for row in frame.itertuples(index=False):
        significant = _truthy(row.significant)
        lo, hi, diff = _finite_number(row.lo), _finite_number(row.hi), _finite_number(row.diff)
        plot = ""
        if diff is not None:
            left, right = scales.get(row.metric, (min(lo, 0.0), max(hi, 0.0)))
            plot = _interval_svg(lo, hi, diff, left, right, bool(significant))
        label = "-" if significant is None else ("yes" if significant else "no")
        metric = str(row.metric) + (f" ({row.unit})" if isinstance(row.unit, str) and row.unit else "")
        rows.append(
            f'<tr class="ci-row{" sig" if significant else ""}">'
            f"<td>{_e(model_display_name(str(row.model)))}</td>"
            f"{_td(_e(format_sparsity_label(str(row.sparsity))), sort=_sparsity_sort(str(row.sparsity)))}"
            f"<td>{_e(method_display_name(str(row.method)))}</td><td>{_e(method_display_name(str(row.baseline)))}</td>"
            f"<td>{_e(metric)}</td>{_td(_e(_num(diff)), sort=diff, css='r')}"
            f"{_td(_e(f'[{_num(lo)}, {_num(hi)}]'), sort=lo, css='r')}{_td(plot, sort=diff)}"
            f"{_td(_e(_significance_text(label, row)), sort=label, title=_noise_text(row))}</tr>")
    note = ('<p class="caption">Method minus baseline with its 95% interval (two-level bootstrap: the seeds of '
            'each side, then the shared windows / items); in the bar the dot is the '
            'difference and the dashed line zero (one scale per metric), red where the interval excludes '
            'zero. "evaluation noise only": a side that depends on the seed has one seed, so no verdict '
            'rests on that interval.</p>')
    return title + note + _table(headers, rows, table_id="intervals-table", sortable=True) + without


# ----------------------------------------------------------------------------- reproduction

def read_reproduction(out_dir: str | os.PathLike) -> tuple[list[dict] | None, str | None]:
    """(rows, problem): rows None when there is no reproduction.json (or it cannot be read)."""
    path = Path(out_dir) / REPRODUCTION_JSON
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{path.name} could not be read: {exc}"
    if isinstance(data, dict):
        data = data.get("rows")
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        return None, f"{path.name} is not a list of rows"
    return data, None


def _flag(value) -> tuple[str, str]:
    """(text, css class) for a yes / no column."""
    truth = _truthy(value)
    if truth is None:
        return "-", ""
    return ("yes", "good") if truth else ("no", "bad")


def _reproduction_section(rows: list[dict] | None, problem: str | None) -> str:
    title = '<h2 id="reproduction">Reproduction</h2>'
    if rows is None:
        text = problem or NO_REPRODUCTION
        return title + f'<p class="empty" id="no-reproduction">{_e(text)}</p>'
    headers = [("Model", "text"), ("Method", "text"), ("Sparsity", "text"), ("Metric", "text"),
               ("Fresh", "num"), ("Reference", "num"), ("Rel. diff", "num"),
               ("Masks identical", "text"), ("Within tolerance", "text")]
    body = []
    for row in rows:
        masks, masks_css = _flag(row.get("masks_identical"))
        within, within_css = _flag(row.get("within_tolerance"))
        body.append(
            f'<tr class="repro-row">'
            f"<td>{_e(model_display_name(str(row.get('model'))))}</td>"
            f"<td>{_e(method_display_name(str(row.get('method'))))}</td>"
            f"{_td(_e(format_sparsity_label(str(row.get('sparsity')))), sort=row.get('sparsity'))}"
            f"<td>{_e(row.get('metric'))}</td>"
            f"{_td(_e(_num(row.get('fresh'), 6)), sort=row.get('fresh'), css='r')}"
            f"{_td(_e(_num(row.get('reference'), 6)), sort=row.get('reference'), css='r')}"
            f"{_td(_e(_num(row.get('rel_diff'), 3)), sort=row.get('rel_diff'), css='r')}"
            f"{_td(_e(masks), css=masks_css)}{_td(_e(within), css=within_css)}</tr>")
    n_within = sum(1 for row in rows if _truthy(row.get("within_tolerance")))
    summary = f'<p class="caption">{n_within} of {len(rows)} rows within tolerance.</p>'
    return title + summary + _table(headers, body, table_id="reproduction-table", sortable=True)


# ----------------------------------------------------------------------------- plots

def _plots_section(plots: Sequence[str | os.PathLike]) -> str:
    figures = []
    for path in plots:
        path = Path(path)
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{_e(path.stem)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_e(path.name)}</figcaption></figure>")
    body = f'<div class="plots">{"".join(figures)}</div>' if figures else '<p class="empty">no plots</p>'
    return '<h2 id="plots">Plots</h2>' + body


# ----------------------------------------------------------------------------- cells + provenance

def _sparsity_sort(label: str) -> float:
    order = sparsity_label_order(str(label))
    return order[0] * 10 + order[1]


def _metric_columns(records: Sequence[dict]) -> tuple[list[str], list[str]]:
    datasets, tasks = [], []
    for record in records:
        evaluation = record.get("eval") or {}
        for dataset in evaluation.get("perplexity") or {}:
            if dataset not in datasets:
                datasets.append(dataset)
        for task, value in (evaluation.get("zeroshot") or {}).items():
            if isinstance(value, dict) and task not in tasks:
                tasks.append(task)
    return datasets, tasks


def _record_sort_key(record: dict) -> tuple:
    sparsity = record.get("sparsity") or {}
    return (model_order((record.get("model") or {}).get("id")),
            sparsity_label_order(str(sparsity.get("label"))),
            method_order(str((record.get("method") or {}).get("name"))), record.get("seed", 0),
            record.get("created_at") or "")


# Three short lines keep the provenance column narrow enough for the table to fit a laptop screen.
VERSION_LINES = (("prunebench", "python"), ("torch", "device"), ("transformers", "lm_eval"))


def _cells_section(records: Sequence[dict]) -> str:
    datasets, tasks = _metric_columns(records)
    headers = ([("Key", "text"), ("Status", "text"), ("Model", "text"), ("Method", "text"),
                ("Sparsity", "num"), ("Seed", "num"), ("Achieved", "num")]
               + [(f"PPL {dataset_display_name(d)}", "num") for d in datasets]
               + [(f"{task_display_name(t)} (%)", "num") for t in tasks]
               + [("Prune s", "num"), ("Eval s", "num"), ("Git sha", "text"), ("Created", "text"),
                  ("Calibration", "text"), ("Versions", "text")])
    rows = []
    for record in sorted(records, key=_record_sort_key):
        model = record.get("model") or {}
        method = record.get("method") or {}
        sparsity = record.get("sparsity") or {}
        evaluation = record.get("eval") or {}
        calibration = record.get("calibration") or {}
        timing = record.get("timing") or {}
        env = record.get("env") or {}
        key, status = str(record.get("key", "")), str(record.get("status", ""))
        error = record.get("error") or ""
        status_html = f'<span class="status status-{_e(re.sub(r"[^a-z0-9_-]", "", status.lower()))}">{_e(status)}</span>'
        last = record.get("_last_attempt") or {}
        if last.get("status") and last.get("status") != status:
            # A later attempt (say a failed --force rerun) did not replace this record.
            error = error or last.get("error") or ""
            status_html += (f'<div class="error">last attempt {_e(last.get("status"))} '
                            f'{_e(last.get("created_at") or "")}</div>')
        if error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            status_html += f'<div class="error">{_e(first[:160])}</div>'
        label = str(sparsity.get("label", ""))
        achieved = sparsity.get("achieved")
        cells = [
            _td(f"<code>{_e(key[:12])}</code>", sort=key, title=key),
            _td(status_html, sort=status, title=str(error)),
            _td(_e(model.get("id")), sort=model.get("id"), css="nowrap"),
            _td(_e(method.get("name")), sort=method.get("name"), css="nowrap"),
            _td(_e(format_sparsity_label(label)), sort=_sparsity_sort(label)),
            _td(_e(record.get("seed", 0)), sort=record.get("seed", 0), css="r"),
            _td(_e("-" if _missing(achieved) else f"{achieved:.4f}"), sort=achieved, css="r"),
        ]
        for dataset in datasets:
            entry = (evaluation.get("perplexity") or {}).get(dataset) or {}
            value, seqlen = entry.get("value"), entry.get("seqlen")
            title = f"{seqlen}-token windows" if seqlen else ""
            if entry.get("diverged") or (isinstance(value, float) and math.isinf(value)):
                # Sorts after every finite perplexity.
                cells.append(_td('<span class="status status-diverged">diverged</span>', sort="Infinity",
                                 css="r", title=title))
            else:
                cells.append(_td(_e(format_number(value)), sort=value, css="r", title=title))
        for task in tasks:
            entry = (evaluation.get("zeroshot") or {}).get(task) or {}
            value, stderr = entry.get("value"), entry.get("stderr")
            text = "-" if _missing(value) else format_number(value * PERCENT)
            if not _missing(value) and not _missing(stderr):
                text += f" ± {format_number(stderr * PERCENT)}"
            cells.append(_td(_e(text), sort=value, css="r",
                             title=f"{entry.get('metric', '')}, n={entry.get('n', '?')}"))
        sha = str(env.get("git_sha") or "")
        created = str(record.get("created_at") or "-")
        fingerprint = calibration.get("fingerprint")
        calib_text = (f"{calibration.get('dataset', '-')} {calibration.get('n_samples', '?')}×"
                      f"{calibration.get('seqlen', '?')}" if calibration else "-")
        versions = "<br>".join(" · ".join(f"{_e(name)} {_e(env[name])}" for name in line if env.get(name))
                               for line in VERSION_LINES if any(env.get(name) for name in line))
        cells += [
            _td(_e(format_number(timing.get("prune_s"), 0)), sort=timing.get("prune_s"), css="r"),
            _td(_e(format_number(timing.get("eval_s"), 0)), sort=timing.get("eval_s"), css="r"),
            _td(f"<code>{_e(sha[:10] or '-')}</code>", sort=sha, title=sha),
            _td(_e(created).replace("T", "<br>", 1), sort=created, css="nowrap"),
            _td(_e(calib_text) + (f"<br><code>{_e(fingerprint)}</code>" if fingerprint else ""),
                sort=fingerprint),
            _td(f'<span class="versions">{versions or "-"}</span>', sort=env.get("prunebench")),
        ]
        rows.append(f'<tr class="cell-row" data-key="{_e(key)}" data-status="{_e(status)}">{"".join(cells)}</tr>')
    n_ok = sum(1 for r in records if r.get("status") == "ok")
    caption = (f'<p class="caption">{len(records)} records ({n_ok} ok, {len(records) - n_ok} not ok), '
               "one row each; click a column header to sort.</p>")
    return ('<h2 id="cells">All cells, with provenance</h2>' + caption
            + _table(headers, rows, table_id="cells-table", css="cells", sortable=True))


# ----------------------------------------------------------------------------- per-layer heat map

_BLOCK_NAME = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?P<index>\d+)\.(?P<kind>.+)$")
OTHER_BLOCK = "other"


def split_linear_name(name: str) -> tuple[str, str]:
    """"model.layers.3.self_attn.q_proj" -> ("3", "self_attn.q_proj"); names outside a numbered
    block (lm_head, ...) go to the "other" row under their full name."""
    match = _BLOCK_NAME.match(name)
    if not match:
        return OTHER_BLOCK, name
    return match["index"], match["kind"]


# A white -> dark blue ramp: 0 (dense) reads as empty, 1 as fully pruned.
_RAMP = ((0.0, (247, 251, 255)), (0.5, (107, 174, 214)), (1.0, (8, 48, 107)))


def sparsity_color(value: float) -> str:
    value = min(max(float(value), 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(_RAMP, _RAMP[1:]):
        if value <= x1:
            t = (value - x0) / (x1 - x0)
            return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(c0, c1))
    return "#%02x%02x%02x" % _RAMP[-1][1]


def _heatmap(record: dict) -> str:
    per_layer = (record.get("sparsity") or {}).get("per_layer") or {}
    grid: dict[str, dict[str, float]] = {}
    kinds: list[str] = []
    for name, value in per_layer.items():
        block, kind = split_linear_name(name)
        if kind not in kinds:
            kinds.append(kind)
        grid.setdefault(block, {})[kind] = value
    blocks = sorted(grid, key=lambda b: (b == OTHER_BLOCK, int(b) if b.isdigit() else 0, b))
    short = [kind.rsplit(".", 1)[-1] for kind in kinds]
    labels = [s if short.count(s) == 1 else k for s, k in zip(short, kinds)]
    head = "<th>block</th>" + "".join(f'<th title="{_e(k)}">{_e(l)}</th>' for k, l in zip(kinds, labels))
    body = []
    for block in blocks:
        cells = []
        for kind in kinds:
            value = grid[block].get(kind)
            if _missing(value):
                cells.append('<td class="hm-none"></td>')
                continue
            ink = "#fff" if value > 0.55 else "#000"
            cells.append(f'<td style="background:{sparsity_color(value)};color:{ink}">{value:.3f}</td>')
        body.append(f"<tr><th>{_e(block)}</th>{''.join(cells)}</tr>")
    values = [v for v in per_layer.values() if not _missing(v)]
    sparsity = record.get("sparsity") or {}
    achieved = sparsity.get("achieved")
    summary = (f"{_e((record.get('model') or {}).get('id'))} · {_e((record.get('method') or {}).get('name'))} · "
               f"{_e(format_sparsity_label(str(sparsity.get('label'))))} · achieved "
               f"{'-' if _missing(achieved) else f'{achieved:.4f}'}"
               + (f" · per layer {min(values):.3f} to {max(values):.3f} over {len(values)} linears" if values else ""))
    key = str(record.get("key", ""))
    return (f'<div class="heatmap" data-key="{_e(key)}"><p class="caption">{summary}</p>'
            f'<div class="scroll"><table class="hm"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></div>')


def _heatmap_section(records: Sequence[dict]) -> str:
    title = '<h2 id="per-layer">Per-layer sparsity</h2>'
    chosen = [r for r in sorted(records, key=_record_sort_key)
              if r.get("status") == "ok" and (r.get("method") or {}).get("name") != "dense"
              and (r.get("sparsity") or {}).get("per_layer")]
    if not chosen:
        return title + '<p class="empty">no per-layer sparsity recorded</p>'
    options = "".join(
        f'<option value="{_e(r["key"])}">{_e((r.get("model") or {}).get("id"))} · '
        f'{_e((r.get("method") or {}).get("name"))} · '
        f'{_e(format_sparsity_label(str((r.get("sparsity") or {}).get("label"))))}</option>'
        for r in chosen)
    legend = ('<div class="legend"><span>0 (dense)</span><span class="ramp" style="background:linear-gradient('
              f'to right,{sparsity_color(0)},{sparsity_color(0.5)},{sparsity_color(1)})"></span>'
              "<span>1 (all pruned)</span></div>")
    control = (f'<p><label for="heatmap-select">Cell: </label><select id="heatmap-select">{options}</select></p>'
               + legend + '<p class="caption">Rows: decoder blocks; columns: kind of linear; fraction of '
               "weights that are zero, measured from the pruned weights.</p>")
    return title + control + "".join(_heatmap(r) for r in chosen)


# ----------------------------------------------------------------------------- the page

CSS = """
:root{--fg:#1d232a;--muted:#5b6670;--line:#d6dbe0;--head:#f1f4f7;--accent:#1f5f99}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Liberation Sans",sans-serif;color:var(--fg);background:#fff}
header{background:#1f2d3d;color:#fff;padding:14px 28px}
header h1{margin:0 0 4px;font-size:20px}
header p{margin:0;color:#c9d3dc;font-size:13px}
header p.notice{margin-top:8px;padding:6px 10px;background:#fff3cd;color:#5c4400;border-radius:3px;font-weight:600}
nav{padding:8px 28px;border-bottom:1px solid var(--line);background:#fafbfc;font-size:13px}
nav a{color:var(--accent);margin-right:14px;text-decoration:none}
main{padding:4px 28px 40px;max-width:100%}
h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:14px;margin:16px 0 6px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:4px 0 8px}
th,td{border:1px solid var(--line);padding:3px 7px;vertical-align:top}
thead th{background:var(--head);text-align:left;white-space:nowrap}
td.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.nowrap{white-space:nowrap}
.paper-table td:first-child{white-space:nowrap}
.paper{color:var(--muted)}
.caption{color:var(--muted);font-size:13px;margin:4px 0}
.empty{color:var(--muted);font-style:italic}
.footnotes{color:var(--muted);font-size:12.5px;margin:4px 0 0;padding-left:18px}
table.sortable thead th{cursor:pointer;user-select:none}
table.sortable thead th::after{content:"\\00a0\\2195";color:#aab3bb}
table.sortable thead th[aria-sort=ascending]::after{content:"\\00a0\\2191";color:var(--accent)}
table.sortable thead th[aria-sort=descending]::after{content:"\\00a0\\2193";color:var(--accent)}
.diff{font-size:11.5px;color:var(--muted);white-space:nowrap}
table.cells{font-size:12px}
table.cells th,table.cells td{padding:3px 5px}
table.cells thead th{white-space:normal;vertical-align:bottom}
.blocks{display:flex;flex-wrap:wrap;gap:0 32px}
table.cells code{font-size:11.5px}
.versions{font-size:11px;color:var(--muted);white-space:nowrap}
.status{display:inline-block;padding:0 6px;border-radius:8px;font-size:11.5px;font-weight:bold;background:#e0e4e8}
.status-ok{background:#d8f0dc;color:#1e6b2e}
.status-failed{background:#f8d7d5;color:#9b1c14}
.status-diverged{background:#fbe7c6;color:#8a4b00}
.error{color:#9b1c14;font-size:11px;max-width:260px;white-space:normal}
td.good{color:#1e6b2e;font-weight:bold}
td.bad{color:#9b1c14;font-weight:bold}
tr.sig td{background:#fdf3f2}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px}
figure{margin:0;border:1px solid var(--line);padding:6px;background:#fff}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:12px;color:var(--muted);text-align:center}
table.hm td{width:64px;text-align:center;font-size:11.5px;padding:1px 4px;font-variant-numeric:tabular-nums}
table.hm th{font-size:11.5px;padding:1px 6px;text-align:center}
td.hm-none{background:repeating-linear-gradient(45deg,#fff,#fff 3px,#eee 3px,#eee 6px)}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;color:var(--muted)}
.legend .ramp{display:inline-block;width:180px;height:12px;border:1px solid var(--line)}
#js-errors{background:#f8d7d5;color:#9b1c14;padding:8px 28px;margin:0}
select{font:inherit}
"""

# First script in <head>: later errors, including ones in the page's own JS, land in the DOM.
ERROR_TRAP_JS = """
(function(){
  var errors=[];
  function flush(){  // errors raised before <body> exists are shown once it does
    var box=document.getElementById("js-errors");if(!box)return;
    while(box.children.length<errors.length){var li=document.createElement("li");li.textContent=errors[box.children.length];box.appendChild(li);}
    box.setAttribute("data-count",String(errors.length));box.hidden=errors.length===0;
  }
  function show(text){errors.push(String(text));flush();}
  window.__pbErrors=errors;
  window.addEventListener("error",function(e){show((e.message||"error")+" at "+(e.filename||"")+":"+(e.lineno||""));});
  window.addEventListener("unhandledrejection",function(e){show("unhandled rejection: "+e.reason);});
  var original=console.error;
  console.error=function(){show(Array.prototype.join.call(arguments," "));return original.apply(console,arguments);};
  document.addEventListener("DOMContentLoaded",flush);
})();
"""

PAGE_JS = """
(function(){
  "use strict";
  function value(row,index,numeric){
    var cell=row.cells[index];if(!cell)return null;
    var raw=cell.hasAttribute("data-v")?cell.getAttribute("data-v"):cell.textContent.trim();
    if(raw===""||raw==="-")return null;
    if(numeric){var n=parseFloat(raw);return isNaN(n)?null:n;}
    return raw.toLowerCase();
  }
  function sortTable(table,index,descending){
    var body=table.tBodies[0],header=table.tHead.rows[0].cells;
    var numeric=header[index].getAttribute("data-type")==="num";
    var items=Array.prototype.map.call(body.rows,function(row,i){return {row:row,i:i,v:value(row,index,numeric)};});
    items.sort(function(a,b){
      if(a.v===null||b.v===null){return a.v===b.v?a.i-b.i:(a.v===null?1:-1);}  // blanks last either way
      var c=numeric?a.v-b.v:a.v.localeCompare(b.v,undefined,{numeric:true});
      return (descending?-c:c)||a.i-b.i;
    });
    items.forEach(function(item){body.appendChild(item.row);});
    Array.prototype.forEach.call(header,function(th,i){
      if(i===index)th.setAttribute("aria-sort",descending?"descending":"ascending");else th.removeAttribute("aria-sort");
    });
  }
  function toggle(table,index){
    var th=table.tHead.rows[0].cells[index];
    sortTable(table,index,th.getAttribute("aria-sort")==="ascending");
  }
  function columnValues(table,index){
    var numeric=table.tHead.rows[0].cells[index].getAttribute("data-type")==="num";
    return Array.prototype.map.call(table.tBodies[0].rows,function(row){return value(row,index,numeric);});
  }
  function monotone(values,descending){
    var seenBlank=false,previous=null;
    for(var i=0;i<values.length;i++){
      var v=values[i];
      if(v===null){seenBlank=true;continue;}
      if(seenBlank)return false;
      if(previous!==null&&(descending?v>previous:v<previous))return false;
      previous=v;
    }
    return true;
  }
  function showHeatmap(key){
    var shown=0;
    Array.prototype.forEach.call(document.querySelectorAll(".heatmap"),function(div){
      div.hidden=div.getAttribute("data-key")!==key;if(!div.hidden)shown++;
    });
    return shown;
  }
  function selftest(){
    var out={errors:window.__pbErrors.length};
    try{checks(out);}catch(e){out.selftest_error=String(e);window.__pbErrors.push("selftest: "+e);}  // still report
    out.errors=window.__pbErrors.length;
    var pre=document.createElement("pre");pre.id="selftest";pre.textContent=JSON.stringify(out);
    document.body.appendChild(pre);
  }
  function checks(out){
    var table=document.getElementById("cells-table");
    out.rows=table?table.tBodies[0].rows.length:0;
    if(table){
      var heads=table.tHead.rows[0].cells,index=-1;
      for(var i=0;i<heads.length;i++){if(heads[i].textContent==="Achieved")index=i;}
      out.sort_column=index;
      heads[index].click();
      out.sorted_ascending=heads[index].getAttribute("aria-sort")==="ascending"&&monotone(columnValues(table,index),false);
      heads[index].click();
      out.sorted_descending=heads[index].getAttribute("aria-sort")==="descending"&&monotone(columnValues(table,index),true);
      var first=table.tBodies[0].rows[0];
      out.first_key_descending=first?first.getAttribute("data-key"):null;
    }
    var select=document.getElementById("heatmap-select");
    out.heatmaps=document.querySelectorAll(".heatmap").length;
    if(select&&select.options.length){
      var last=select.options[select.options.length-1].value;
      select.value=last;select.dispatchEvent(new Event("change"));
      var visible=document.querySelectorAll(".heatmap:not([hidden])");
      out.heatmap_switch=visible.length===1&&visible[0].getAttribute("data-key")===last;
      select.value=select.options[0].value;select.dispatchEvent(new Event("change"));
    }
    var root=document.documentElement;
    out.page_height=Math.max(root.scrollHeight,document.body.scrollHeight);
    out.page_overflows=root.scrollWidth>root.clientWidth;
    out.overflowing=Array.prototype.filter.call(document.querySelectorAll(".scroll"),function(div){
      return div.offsetParent!==null&&div.scrollWidth>div.clientWidth+1;
    }).map(function(div){var t=div.querySelector("table");return (t&&(t.id||t.className))||"?";});
  }
  document.addEventListener("DOMContentLoaded",function(){
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"),function(table){
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,index){
        th.addEventListener("click",function(){toggle(table,index);});
        th.addEventListener("keydown",function(e){if(e.key==="Enter"||e.key===" "){e.preventDefault();toggle(table,index);}});
      });
    });
    var select=document.getElementById("heatmap-select");
    if(select){select.addEventListener("change",function(){showHeatmap(select.value);});showHeatmap(select.value);}
    if(location.hash==="#selftest")selftest();
  });
})();
"""


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
        f'<h2 id="main">Main table (the {_e(reference_paper().name)} paper\'s layout)</h2>', _main_table_section(df),
        _gains_section(df), _perplexity_section(df), _dense_relative_section(df), _comparisons_section(comparisons),
        _reproduction_section(reproduction, reproduction_problem), _plots_section(plots),
        _cells_section(records), _heatmap_section(records),
    ]
    nav = "".join(f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text in (
        ("main", "Main table"), ("gains", "Gains"), ("perplexity", "Perplexity"), ("dense-relative", "KL / top-1"),
        ("intervals", "95% intervals"), ("reproduction", "Reproduction"), ("plots", "Plots"),
        ("cells", "All cells"), ("per-layer", "Per-layer sparsity")))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No favicon request: a file:// page asking for one logs a console error in some browsers.
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><script>{ERROR_TRAP_JS}</script><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{len(records)} records ({n_ok} ok, {len(records) - n_ok} not ok)"
        f"{span} · accuracies in percent</p>"
        + (f'<p class="notice" role="alert">{_e(notice)}</p>' if notice else "") + "</header>"
        '<ul id="js-errors" data-count="0" hidden></ul>'
        f"<nav>{nav}</nav><main>{''.join(sections)}</main><script>{PAGE_JS}</script></body></html>\n")


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


# ----------------------------------------------------------------------------- headless chromium

class ChromiumError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$PRUNEBENCH_CHROMIUM, else the first Chromium / Chrome binary on PATH, else None."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _console_messages(stderr: str) -> list[str]:
    """Chromium's --enable-logging lines for the page's console (any level): `...:CONSOLE...] "msg", source: ...`."""
    return [line.split("] ", 1)[-1] for line in stderr.splitlines() if ":CONSOLE" in line]


def _run_chromium(html_path: str | os.PathLike, fragment: str, extra: Sequence[str],
                  chromium: str | None, timeout: float, budget_ms: int) -> subprocess.CompletedProcess:
    binary = chromium or find_chromium()
    if not binary:
        raise ChromiumError("no chromium binary found (install Debian's `chromium`, or set "
                            f"{CHROMIUM_ENV})")
    url = Path(html_path).resolve().as_uri() + fragment
    # A private profile per run: concurrent runs do not fight over one profile lock, and nothing
    # is left in the user's ~/.config.
    with tempfile.TemporaryDirectory(prefix="prunebench-chromium-") as profile:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                   "--v=0", "--no-first-run", "--disable-extensions", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ChromiumError(f"{' '.join(command)} exited {result.returncode}: {result.stderr[-2000:]}")
    return result


def dump_dom(html_path: str | os.PathLike, fragment: str = "", *, width: int = SCREENSHOT_WIDTH,
             chromium: str | None = None, timeout: float = 120,
             budget_ms: int = 5000) -> tuple[str, list[str]]:
    """Load the page in headless Chromium at `width` pixels; return (the DOM after its scripts ran,
    console messages)."""
    result = _run_chromium(html_path, fragment, ["--dump-dom", f"--window-size={width},900"],
                           chromium, timeout, budget_ms)
    return result.stdout, _console_messages(result.stderr)


def selftest(html_path: str | os.PathLike, **kwargs) -> tuple[dict, str, list[str]]:
    """Open the page with #selftest: (the JSON its JS wrote, the DOM, console messages)."""
    dom, console = dump_dom(html_path, "#selftest", **kwargs)
    match = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    if not match:
        raise ChromiumError("the page wrote no #selftest result (did its script run?)")
    return json.loads(html.unescape(match.group(1))), dom, console


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, *, width: int = SCREENSHOT_WIDTH,
               height: int | None = None, chromium: str | None = None, timeout: float = 120) -> Path:
    """A PNG of the whole page (height measured by the page itself unless given)."""
    if height is None:
        result, _, _ = selftest(html_path, width=width, chromium=chromium, timeout=timeout)
        height = int(result.get("page_height") or 2000)
    height = max(200, min(int(height), MAX_SCREENSHOT_HEIGHT))
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run_chromium(html_path, "", [f"--window-size={width},{height}", f"--screenshot={png}"],
                  chromium, timeout, 5000)
    if not png.is_file() or png.stat().st_size == 0:
        raise ChromiumError(f"chromium wrote no screenshot at {png}")
    return png


def main(argv: Sequence[str] | None = None) -> int:
    """python -m prunebench.report.html [index.html [index.png]]: screenshot the page."""
    args = list(sys.argv[1:] if argv is None else argv)
    page = Path(args[0]) if args else Path("results") / "report" / HTML_NAME
    png = Path(args[1]) if len(args) > 1 else page.with_name(SCREENSHOT_NAME)
    try:
        print(screenshot(page, png))
    except (ChromiumError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
