"""The page's sections built from the records themselves: the plots (inlined PNGs), every cell
with its provenance, and the per-layer sparsity heat map of each pruned cell."""
from __future__ import annotations

import base64
import math
import os
import re
from pathlib import Path
from typing import Sequence

from prunebench.report.format import (dataset_display_name, format_number, format_sparsity_label, method_order,
                                      model_order, sparsity_label_order, task_display_name)
from prunebench.report.page.markup import escape, missing, sparsity_sort, table, td
from prunebench.report.paper import PERCENT

# Three short lines keep the provenance column narrow enough for the table to fit a laptop screen.
VERSION_LINES = (("prunebench", "python"), ("torch", "device"), ("transformers", "lm_eval"))
_BLOCK_NAME = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?P<index>\d+)\.(?P<kind>.+)$")
OTHER_BLOCK = "other"
# A white -> dark blue ramp: 0 (dense) reads as empty, 1 as fully pruned.
_RAMP = ((0.0, (247, 251, 255)), (0.5, (107, 174, 214)), (1.0, (8, 48, 107)))


def plots_section(plots: Sequence[str | os.PathLike]) -> str:
    figures = []
    for path in plots:
        path = Path(path)
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{escape(path.stem)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{escape(path.name)}</figcaption></figure>")
    body = f'<div class="plots">{"".join(figures)}</div>' if figures else '<p class="empty">no plots</p>'
    return '<h2 id="plots">Plots</h2>' + body


# ----------------------------------------------------------------------------- cells + provenance

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


def cells_section(records: Sequence[dict]) -> str:
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
        status_html = f'<span class="status status-{escape(re.sub(r"[^a-z0-9_-]", "", status.lower()))}">{escape(status)}</span>'
        last = record.get("_last_attempt") or {}
        if last.get("status") and last.get("status") != status:
            # A later attempt (say a failed --force rerun) did not replace this record.
            error = error or last.get("error") or ""
            status_html += (f'<div class="error">last attempt {escape(last.get("status"))} '
                            f'{escape(last.get("created_at") or "")}</div>')
        if error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            status_html += f'<div class="error">{escape(first[:160])}</div>'
        label = str(sparsity.get("label", ""))
        achieved = sparsity.get("achieved")
        cells = [
            td(f"<code>{escape(key[:12])}</code>", sort=key, title=key),
            td(status_html, sort=status, title=str(error)),
            td(escape(model.get("id")), sort=model.get("id"), css="nowrap"),
            td(escape(method.get("name")), sort=method.get("name"), css="nowrap"),
            td(escape(format_sparsity_label(label)), sort=sparsity_sort(label)),
            td(escape(record.get("seed", 0)), sort=record.get("seed", 0), css="r"),
            td(escape("-" if missing(achieved) else f"{achieved:.4f}"), sort=achieved, css="r"),
        ]
        for dataset in datasets:
            entry = (evaluation.get("perplexity") or {}).get(dataset) or {}
            value, seqlen = entry.get("value"), entry.get("seqlen")
            title = f"{seqlen}-token windows" if seqlen else ""
            if entry.get("diverged") or (isinstance(value, float) and math.isinf(value)):
                # Sorts after every finite perplexity.
                cells.append(td('<span class="status status-diverged">diverged</span>', sort="Infinity",
                                css="r", title=title))
            else:
                cells.append(td(escape(format_number(value)), sort=value, css="r", title=title))
        for task in tasks:
            entry = (evaluation.get("zeroshot") or {}).get(task) or {}
            value, stderr = entry.get("value"), entry.get("stderr")
            text = "-" if missing(value) else format_number(value * PERCENT)
            if not missing(value) and not missing(stderr):
                text += f" ± {format_number(stderr * PERCENT)}"
            cells.append(td(escape(text), sort=value, css="r",
                            title=f"{entry.get('metric', '')}, n={entry.get('n', '?')}"))
        sha = str(env.get("git_sha") or "")
        created = str(record.get("created_at") or "-")
        fingerprint = calibration.get("fingerprint")
        calib_text = (f"{calibration.get('dataset', '-')} {calibration.get('n_samples', '?')}×"
                      f"{calibration.get('seqlen', '?')}" if calibration else "-")
        versions = "<br>".join(" · ".join(f"{escape(name)} {escape(env[name])}" for name in line if env.get(name))
                               for line in VERSION_LINES if any(env.get(name) for name in line))
        cells += [
            td(escape(format_number(timing.get("prune_s"), 0)), sort=timing.get("prune_s"), css="r"),
            td(escape(format_number(timing.get("eval_s"), 0)), sort=timing.get("eval_s"), css="r"),
            td(f"<code>{escape(sha[:10] or '-')}</code>", sort=sha, title=sha),
            td(escape(created).replace("T", "<br>", 1), sort=created, css="nowrap"),
            td(escape(calib_text) + (f"<br><code>{escape(fingerprint)}</code>" if fingerprint else ""),
               sort=fingerprint),
            td(f'<span class="versions">{versions or "-"}</span>', sort=env.get("prunebench")),
        ]
        rows.append(f'<tr class="cell-row" data-key="{escape(key)}" data-status="{escape(status)}">{"".join(cells)}</tr>')
    n_ok = sum(1 for r in records if r.get("status") == "ok")
    caption = (f'<p class="caption">{len(records)} records ({n_ok} ok, {len(records) - n_ok} not ok), '
               "one row each; click a column header to sort.</p>")
    return ('<h2 id="cells">All cells, with provenance</h2>' + caption
            + table(headers, rows, table_id="cells-table", css="cells", sortable=True))


# ----------------------------------------------------------------------------- per-layer heat map

def split_linear_name(name: str) -> tuple[str, str]:
    """"model.layers.3.self_attn.q_proj" -> ("3", "self_attn.q_proj"); names outside a numbered
    block (lm_head, ...) go to the "other" row under their full name."""
    match = _BLOCK_NAME.match(name)
    if not match:
        return OTHER_BLOCK, name
    return match["index"], match["kind"]


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
    head = "<th>block</th>" + "".join(f'<th title="{escape(k)}">{escape(l)}</th>' for k, l in zip(kinds, labels))
    body = []
    for block in blocks:
        cells = []
        for kind in kinds:
            value = grid[block].get(kind)
            if missing(value):
                cells.append('<td class="hm-none"></td>')
                continue
            ink = "#fff" if value > 0.55 else "#000"
            cells.append(f'<td style="background:{sparsity_color(value)};color:{ink}">{value:.3f}</td>')
        body.append(f"<tr><th>{escape(block)}</th>{''.join(cells)}</tr>")
    values = [v for v in per_layer.values() if not missing(v)]
    sparsity = record.get("sparsity") or {}
    achieved = sparsity.get("achieved")
    summary = (f"{escape((record.get('model') or {}).get('id'))} · {escape((record.get('method') or {}).get('name'))} · "
               f"{escape(format_sparsity_label(str(sparsity.get('label'))))} · achieved "
               f"{'-' if missing(achieved) else f'{achieved:.4f}'}"
               + (f" · per layer {min(values):.3f} to {max(values):.3f} over {len(values)} linears" if values else ""))
    key = str(record.get("key", ""))
    return (f'<div class="heatmap" data-key="{escape(key)}"><p class="caption">{summary}</p>'
            f'<div class="scroll"><table class="hm"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></div>')


def heatmap_section(records: Sequence[dict]) -> str:
    title = '<h2 id="per-layer">Per-layer sparsity</h2>'
    chosen = [r for r in sorted(records, key=_record_sort_key)
              if r.get("status") == "ok" and (r.get("method") or {}).get("name") != "dense"
              and (r.get("sparsity") or {}).get("per_layer")]
    if not chosen:
        return title + '<p class="empty">no per-layer sparsity recorded</p>'
    options = "".join(
        f'<option value="{escape(r["key"])}">{escape((r.get("model") or {}).get("id"))} · '
        f'{escape((r.get("method") or {}).get("name"))} · '
        f'{escape(format_sparsity_label(str((r.get("sparsity") or {}).get("label"))))}</option>'
        for r in chosen)
    legend = ('<div class="legend"><span>0 (dense)</span><span class="ramp" style="background:linear-gradient('
              f'to right,{sparsity_color(0)},{sparsity_color(0.5)},{sparsity_color(1)})"></span>'
              "<span>1 (all pruned)</span></div>")
    control = (f'<p><label for="heatmap-select">Cell: </label><select id="heatmap-select">{options}</select></p>'
               + legend + '<p class="caption">Rows: decoder blocks; columns: kind of linear; fraction of '
               "weights that are zero, measured from the pruned weights.</p>")
    return title + control + "".join(_heatmap(r) for r in chosen)
