"""The page's reproduction section: the rows of reproduction.json (`prunebench reproduce`), a
fresh run's figures against the committed reference, when the report folder holds one."""
from __future__ import annotations

import json
import os
from pathlib import Path

from prunebench.report.format import format_sparsity_label, method_display_name, model_display_name
from prunebench.report.page.markup import escape, num, table, td, truth

REPRODUCTION_JSON = "reproduction.json"
NO_REPRODUCTION = "no reproduction run"


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
    flag = truth(value)
    if flag is None:
        return "-", ""
    return ("yes", "good") if flag else ("no", "bad")


def reproduction_section(rows: list[dict] | None, problem: str | None) -> str:
    title = '<h2 id="reproduction">Reproduction</h2>'
    if rows is None:
        text = problem or NO_REPRODUCTION
        return title + f'<p class="empty" id="no-reproduction">{escape(text)}</p>'
    headers = [("Model", "text"), ("Method", "text"), ("Sparsity", "text"), ("Metric", "text"),
               ("Fresh", "num"), ("Reference", "num"), ("Rel. diff", "num"),
               ("Masks identical", "text"), ("Within tolerance", "text")]
    body = []
    for row in rows:
        masks, masks_css = _flag(row.get("masks_identical"))
        within, within_css = _flag(row.get("within_tolerance"))
        body.append(
            f'<tr class="repro-row">'
            f"<td>{escape(model_display_name(str(row.get('model'))))}</td>"
            f"<td>{escape(method_display_name(str(row.get('method'))))}</td>"
            f"{td(escape(format_sparsity_label(str(row.get('sparsity')))), sort=row.get('sparsity'))}"
            f"<td>{escape(row.get('metric'))}</td>"
            f"{td(escape(num(row.get('fresh'), 6)), sort=row.get('fresh'), css='r')}"
            f"{td(escape(num(row.get('reference'), 6)), sort=row.get('reference'), css='r')}"
            f"{td(escape(num(row.get('rel_diff'), 3)), sort=row.get('rel_diff'), css='r')}"
            f"{td(escape(masks), css=masks_css)}{td(escape(within), css=within_css)}</tr>")
    n_within = sum(1 for row in rows if truth(row.get("within_tolerance")))
    summary = f'<p class="caption">{n_within} of {len(rows)} rows within tolerance.</p>'
    return title + summary + table(headers, body, table_id="reproduction-table", sortable=True)
