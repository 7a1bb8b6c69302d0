"""How the report prints things: numbers rounded as a person prints them, footnote markers,
sparsity / model / method / task / dataset labels and the order rows go in, LaTeX escaping and
CSV text. Every table, the page and the plots print through here, so they agree to the digit.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pandas as pd

from prunebench import registry
from prunebench.data.windows import is_text_path
from prunebench.engines import allocation as allocations
from prunebench.report import uncertainty
from prunebench.report.paper import reference_paper
from prunebench.sparsity.pattern_registry import display_label, label_from_record, label_sort_key

# Rows go by the kind each method's class declares in the registry (dense, then layer-wise, then
# learned), then by display name; the report itself lists no method.
KIND_ORDER = ("dense", "layer-wise", "learned", "other")

DENSE_LABEL = "dense"
DEFAULT_PATTERN = "unstructured"
DISPLAY_DECIMALS = 2
NOT_AVAILABLE = "-"
DIVERGED = "diverged"


# ----------------------------------------------------------------------------- markers

@dataclass(frozen=True)
class Marker:
    """A footnote marker: its symbol in markdown / CSV, its LaTeX form and what it means."""
    symbol: str
    latex: str
    meaning: str


AVG_INCONSISTENT = Marker(
    "*", r"$^{*}$",
    "the published Avg cannot come from its printed cells, even allowing for rounding; "
    "the table shows the mean of the cells")
AVG_ROUNDING = Marker(
    "°", r"$^{\circ}$",
    "the published Avg differs from the mean of its printed cells by one unit in the last "
    "digit, within the rounding of the cells; the table shows the mean of the cells")
AVG_PARTIAL = Marker("†", r"$^{\dagger}$", "Avg over the tasks present only")
AVG_PUBLISHED_ONLY = Marker(
    "‡", r"$^{\ddagger}$", "task cells not published; Avg as published")
NOT_SIGNIFICANT = Marker(
    "ⁿˢ", r"$^{\mathrm{ns}}$", "not significant: the 95% paired-bootstrap interval contains zero")
NO_INTERVAL = Marker("¶", r"$^{\P}$", uncertainty.NO_ITEM_DATA)
NOT_COMPARABLE = Marker(
    "≠", r"$^{\neq}$", "no interval: not scored on the same windows / items as its baseline")
EVAL_NOISE_ONLY = Marker(
    "ᵉ", r"$^{\mathrm{e}}$", "evaluation noise only: a side that depends on the calibration seed was run with "
    "one seed, so the seed's noise is not in this interval and no verdict may rest on it")
AVG_MARKERS = (AVG_INCONSISTENT, AVG_ROUNDING, AVG_PARTIAL, AVG_PUBLISHED_ONLY)
INTERVAL_MARKERS = (NOT_SIGNIFICANT, NO_INTERVAL, NOT_COMPARABLE, EVAL_NOISE_ONLY)


def source_markers() -> dict[str, Marker]:
    """The publication a reference row comes from, where it is not the paper of the table, and
    the marker that says so (from the paper's data file)."""
    return {other.source: Marker(other.symbol, other.latex, other.meaning)
            for other in reference_paper().other_sources}


def footnote_order() -> tuple[Marker, ...]:
    """Every marker in the order footnotes are listed: the Avg ones, the sources', the intervals'."""
    return AVG_MARKERS + tuple(source_markers().values()) + INTERVAL_MARKERS


@dataclass
class Footnote:
    """One line under a table: the marker it explains (None for a plain note) and its text."""
    marker: Marker | None
    text: str


def footnote_line(note: Footnote, latex: bool = False) -> str:
    if note.marker is None:
        return note.text
    symbol = note.marker.latex if latex else note.marker.symbol
    return f"{symbol} {note.text}"


DIFFERENCE_CAPTION = (f"Pruned {{what}} add the difference from {{baseline}} with its 95% bootstrap "
                      f"interval [lo, hi] ({uncertainty.N_RESAMPLES} resamples: the seeds of each side, then the "
                      f"shared windows / items; Avg: items resampled within each task).")


# ----------------------------------------------------------------------------- numbers

def round_printed(value: float, decimals: int = DISPLAY_DECIMALS) -> float:
    """Round half up, as a person printing a table would, immune to binary representation noise
    (44.885 stored as 44.88499999 still rounds to 44.89)."""
    denoised = Decimal(f"{value:.9f}")
    return float(denoised.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def format_number(value: float | None, decimals: int = DISPLAY_DECIMALS) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return NOT_AVAILABLE
    if math.isinf(value):  # a diverged model (its record holds no finite perplexity)
        return DIVERGED
    return f"{round_printed(value, decimals):.{decimals}f}"


def signed(value: float) -> str:
    return f"{round_printed(value):+.{DISPLAY_DECIMALS}f}"


def is_missing(value) -> bool:
    """NaN / None / NA; a list, tuple or dict (a score vector) is never missing."""
    if isinstance(value, (list, tuple, dict)):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def format_sd(sd: float | None, latex: bool = False) -> str:
    """" ± 0.42" after a mean over seeds (its sample SD); "" for one seed."""
    if sd is None or is_missing(sd) or not math.isfinite(sd):
        return ""
    return (r" $\pm$ " if latex else " ± ") + format_number(sd)


def format_difference(difference, latex: bool = False) -> str:
    """A Difference (differences.py) as "+14.64 [12.10, 17.30]", with the not-significant /
    no-interval marker; "" for none."""
    if difference is None or difference.diff is None:
        return ""
    text = signed(difference.diff)
    if difference.lo is not None:
        text += f" [{format_number(difference.lo)}, {format_number(difference.hi)}]"
    text += "".join(m.latex if latex else m.symbol for m in difference.markers)
    return text


def difference_columns(prefix: str, difference) -> dict:
    """A Difference (or None) as CSV columns `<prefix>_diff`, `_lo`, `_hi` (rounded as printed),
    `_significant`, `_note`."""
    d = difference
    rounded = lambda v: None if v is None else round_printed(v)  # noqa: E731
    return {f"{prefix}_diff": rounded(d.diff) if d else None, f"{prefix}_lo": rounded(d.lo) if d else None,
            f"{prefix}_hi": rounded(d.hi) if d else None,
            f"{prefix}_significant": d.significant if d else None, f"{prefix}_note": d.note if d else None}


# ----------------------------------------------------------------------------- sparsity labels

def format_sparsity_label(label: str) -> str:
    """"0.5" -> "50%", "2:4" -> "2:4", "hybrid:0.35/64" -> "35% tiles/64", "dense" -> "dense": as
    each label's pattern prints it (Pattern.display_label)."""
    return display_label(label)


def sparsity_label_order(label: str) -> tuple:
    """Sort key: dense, then unstructured targets ascending, then N:M patterns, then dense-or-2:4
    tiles by effective sparsity (each pattern's label_rank), then the rest."""
    if label == DENSE_LABEL:
        return (0, 0.0, label)
    return label_sort_key(label)


def derive_sparsity_label(row: pd.Series) -> str:
    """The label of a record row that carries none: "dense", its pattern, or its target ("0.5")."""
    if row["method"] == "dense":
        return DENSE_LABEL
    return label_from_record(str(row.get("pattern", DEFAULT_PATTERN)), row["sparsity"])


# ----------------------------------------------------------------------------- row order, names

def method_order(method: str) -> tuple:
    """Kind (from the registry), then display name; a method with an allocation follows it."""
    base, _, allocation = str(method).partition("+")
    kind = registry.method_kind(base)
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), method_display_name(base).lower(),
            allocation)


def model_order(model_id: str) -> tuple:
    """The paper's models in the paper's order, then every other model alphabetically."""
    paper_ids = [model.lower() for model in reference_paper().model_ids.values()]
    if str(model_id).lower() in paper_ids:
        return (paper_ids.index(str(model_id).lower()), "")
    return (len(paper_ids), str(model_id).lower())


def model_display_name(model_id: str) -> str:
    """The paper's name for a model it evaluated, else the id itself."""
    for name, known_id in reference_paper().model_ids.items():
        if known_id.lower() == str(model_id).lower():
            return name
    return str(model_id)


def method_display_name(method: str) -> str:
    """'wanda+owl' -> 'Wanda + OWL': the method's name and its allocation's (from the allocation
    registry, so the report never lists allocations itself)."""
    base, _, allocation = str(method).partition("+")
    name = registry.display_name(base)
    if allocation:
        try:
            name += " + " + allocations.display_name(allocation)
        except Exception:  # a record from an allocation this install does not have
            name += " + " + allocation
    return name


def task_display_name(task: str) -> str:
    return reference_paper().task_names.get(task, task)


def dataset_display_name(dataset: str) -> str:
    """A perplexity text by name ("lee", "wikitext2") as it is; one given by path by its file or
    folder name (the record keeps the path and the text's hash)."""
    return Path(str(dataset).rstrip("/\\")).name or str(dataset) if is_text_path(dataset) else str(dataset)


def dataset_file_label(dataset: str) -> str:
    """A perplexity text's part of a file name: never a path, and two texts with the same file
    name in different folders stay apart (a short hash of the path)."""
    name = re.sub(r"[^A-Za-z0-9._]+", "-", dataset_display_name(dataset)).strip("-.") or "text"
    if is_text_path(dataset):
        name += "-" + hashlib.sha256(str(dataset).encode("utf-8")).hexdigest()[:6]
    return name


# ----------------------------------------------------------------------------- LaTeX, CSV

_LATEX_SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                   "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "\\": r"\textbackslash{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(character, character) for character in str(text))


def csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")
