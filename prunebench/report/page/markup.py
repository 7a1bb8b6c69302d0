"""Small HTML helpers of the page: escaping, table cells with the value the page's JS sorts on,
sortable tables, numbers with significant digits, and the page's stylesheet and scripts (package
data beside this file, read when a page is built)."""
from __future__ import annotations

import html
import math
from importlib import resources
from typing import Iterable, Sequence

import pandas as pd

from prunebench.report.format import sparsity_label_order


def asset(name: str) -> str:
    """page.css, error_trap.js or page.js: the text inlined into every page."""
    return resources.files("prunebench.report.page").joinpath(name).read_text(encoding="utf-8")


def escape(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def num(value, digits: int = 4) -> str:
    """Significant digits, not decimals: differences and ratios span many magnitudes."""
    if missing(value):
        return "-"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def truth(value) -> bool | None:
    """A yes / no cell: None when missing."""
    if missing(value):
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value)


def finite_number(value) -> float | None:
    number = pd.to_numeric(value, errors="coerce")
    return None if missing(number) or not math.isfinite(number) else float(number)


def sparsity_sort(label: str) -> float:
    """A sparsity label as one number the page's JS sorts on (sparsity_label_order's order)."""
    order = sparsity_label_order(str(label))
    return order[0] * 10 + order[1]


def _sort_value(value) -> str:
    return "" if missing(value) else str(value)


def table(headers: Sequence[tuple[str, str]], rows: Iterable[str], *, table_id: str = "",
          css: str = "", sortable: bool = False) -> str:
    """headers: (label, "num" | "text"); rows: pre-rendered <tr> strings."""
    classes = " ".join(c for c in (css, "sortable" if sortable else "") if c)
    head = "".join(f'<th data-type="{kind}" scope="col"{" tabindex=0" if sortable else ""}>'
                   f'{escape(label).replace("_", "_<wbr>")}</th>'
                   for label, kind in headers)
    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{classes}"' if classes else "")
    return (f'<div class="scroll"><table{attrs}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def td(text: str, sort=None, css: str = "", title: str = "") -> str:
    """`text` is already escaped HTML; `sort` is the raw value the JS sorts on."""
    attrs = ""
    if sort is not None:
        attrs += f' data-v="{escape(_sort_value(sort))}"'
    if css:
        attrs += f' class="{css}"'
    if title:
        attrs += f' title="{escape(title)}"'
    return f"<td{attrs}>{text}</td>"
