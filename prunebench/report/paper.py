"""The published papers' numbers, read from the data files in prunebench/report/published/.

published/papers.yaml names the paper whose main table the report's layout follows (`layout`: its
tasks, perplexity text, models, headline gain and reference rows) and the papers shown as a table
of their own (`tables`). Each paper is a YAML file saying what it is and where its numbers come
from, beside a CSV of its rows in percent exactly as printed, so that they can be checked against
the paper by eye. The files are read on first use, never at import.

Accuracy convention of the whole report layer: every DataFrame holds accuracies as fractions in
[0, 1] (the run records' convention, `acc_<task>` and `published_avg` alike); rendered tables,
plots and gain figures show percent points. `paper_reference_frame` converts the printed percent.
"""
from __future__ import annotations

import csv
import functools
import io
import math
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Mapping

import pandas as pd

from prunebench.bounded_yaml import load_yaml

PUBLISHED_DIR = "published"
INDEX_FILE = "papers.yaml"
# Percent points per unit fraction: printed tables and plots show accuracies in percent.
PERCENT = 100.0


@dataclass(frozen=True)
class OtherSource:
    """A publication of some reference rows that is not the paper itself, and the footnote marker
    (symbol, LaTeX form, meaning) that says so beside those rows."""
    source: str
    sibling_study: bool
    symbol: str
    latex: str
    meaning: str


@dataclass(frozen=True)
class ReferencePaper:
    """The paper whose main table the report's layout follows (published/papers.yaml, `layout`)."""
    name: str
    source: str
    tasks: tuple[str, ...]                  # its lm-eval tasks, in its column order
    task_names: Mapping[str, str]           # task -> its column name
    ppl_dataset: str                        # the text of its perplexities
    pattern: str                            # the sparsity pattern of its rows
    model_ids: Mapping[str, str]            # its name of a model -> HF id, in the report's order
    model_families: Mapping[str, str]       # HF id -> family
    headline_method: str                    # its headline claim: method minus baseline, in
    headline_baseline: str                  # average-accuracy points per sparsity label and
    headline_gain: Mapping[str, float]      # over all settings ("all")
    other_sources: tuple[OtherSource, ...]
    rows: tuple[Mapping[str, str], ...]     # its CSV rows as printed (percent)


@dataclass(frozen=True)
class PublishedRow:
    method: str
    sparsity_label: str   # as prunebench writes it ("dense", "2:4", "hybrid:0.35/128")
    ppl: float
    avg: float | None     # percent; None where not published


@dataclass(frozen=True)
class PublishedTable:
    """A paper shown as a table of its own: perplexity and average accuracy of one model."""
    source: str
    model: str
    ppl_column: str
    avg_column: str
    note: str
    rows: tuple[PublishedRow, ...]


def _read(name: str) -> str:
    return resources.files("prunebench.report").joinpath(PUBLISHED_DIR, name).read_text(encoding="utf-8")


def _read_yaml(name: str) -> dict:
    return load_yaml(_read(name), f"prunebench/report/{PUBLISHED_DIR}/{name}")


def _read_csv(name: str) -> tuple[dict, ...]:
    return tuple(csv.DictReader(io.StringIO(_read(name))))


def _optional_number(text: str) -> float | None:
    return float(text) if text.strip() else None


@functools.cache
def reference_paper() -> ReferencePaper:
    """The layout's paper, read once from its data files."""
    paper = _read_yaml(_read_yaml(INDEX_FILE)["layout"])
    headline = paper["headline"]
    return ReferencePaper(
        name=paper["name"], source=paper["source"],
        tasks=tuple(task for task, _ in paper["tasks"]),
        task_names=MappingProxyType({task: name for task, name in paper["tasks"]}),
        ppl_dataset=paper["ppl_dataset"], pattern=paper["pattern"],
        model_ids=MappingProxyType({name: model_id for name, model_id, _ in paper["models"]}),
        model_families=MappingProxyType({model_id: family for _, model_id, family in paper["models"]}),
        headline_method=headline["method"], headline_baseline=headline["baseline"],
        headline_gain=MappingProxyType({str(label): float(gain) for label, gain in headline["gain"].items()}),
        other_sources=tuple(OtherSource(**source) for source in paper["other_sources"]),
        rows=tuple(MappingProxyType(row) for row in _read_csv(paper["rows"])))


@functools.cache
def published_tables() -> tuple[PublishedTable, ...]:
    """The papers shown as a table of their own, in papers.yaml's order."""
    tables = []
    for name in _read_yaml(INDEX_FILE)["tables"]:
        paper = _read_yaml(name)
        rows = tuple(PublishedRow(row["method"], row["sparsity_label"], float(row["ppl"]),
                                  _optional_number(row["avg"])) for row in _read_csv(paper["rows"]))
        tables.append(PublishedTable(paper["source"], paper["model"], paper["ppl_column"], paper["avg_column"],
                                     paper["note"], rows))
    return tuple(tables)


def sparsity_label(sparsity: float, method: str) -> str:
    """The run records' label for an unstructured target: "dense", or the fraction ("0.5")."""
    if method == "dense":
        return "dense"
    return f"{sparsity:g}"


def _reference_row(paper: ReferencePaper, display_name: str, method: str, sparsity: float, ppl: float,
                   accuracies_percent: dict[str, float], avg_percent: float, source: str) -> dict:
    model_id = paper.model_ids[display_name]
    row = {
        "model": model_id,
        "family": paper.model_families[model_id],
        "method": method,
        "sparsity": sparsity,
        "pattern": paper.pattern,
        "sparsity_label": sparsity_label(sparsity, method),
        # The paper reports targets only; the achieved sparsity of its masks is not published.
        "achieved_sparsity": math.nan,
        "status": "ok",
        f"ppl_{paper.ppl_dataset}": ppl,
        f"ppl_{paper.ppl_dataset}_seqlen": pd.NA,
    }
    for task in paper.tasks:
        value = accuracies_percent.get(task)
        row[f"acc_{task}"] = math.nan if value is None else value / PERCENT
        row[f"stderr_{task}"] = math.nan
    row["published_avg"] = avg_percent / PERCENT
    row["source"] = source
    return row


def paper_reference_frame(include_sibling_study: bool = True) -> pd.DataFrame:
    """The layout paper's published numbers as a DataFrame in the run-record column convention.

    Accuracies (`acc_<task>`, `published_avg`) are fractions; `ppl_<dataset>_seqlen` is missing
    (not stated by the paper); `source` names the publication of each row. Rows that were only
    published as PPL / Avg have NaN task cells; rows of a sibling study are left out on request.
    """
    paper = reference_paper()
    sibling = {other.source for other in paper.other_sources if other.sibling_study}
    rows = []
    for printed in paper.rows:
        if printed["source"] in sibling and not include_sibling_study:
            continue
        accuracies = {task: float(printed[task]) for task in paper.tasks if printed[task].strip()}
        rows.append(_reference_row(paper, printed["model"], printed["method"], float(printed["sparsity"]),
                                   float(printed["ppl"]), accuracies, float(printed["avg"]), printed["source"]))
    frame = pd.DataFrame(rows)
    frame[f"ppl_{paper.ppl_dataset}_seqlen"] = frame[f"ppl_{paper.ppl_dataset}_seqlen"].astype("Int64")
    return frame
