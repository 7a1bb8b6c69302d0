"""The main table in the paper's layout: one block per sparsity label (dense rows repeated in
every block), rows ordered by model and method, columns PPL, the tasks and Avg; every cell in
display units (percent points for accuracies) with the paper's value beside it where the paper
published the same model, method and sparsity, and for pruned rows of frames with item scores
the difference from the model's dense row. Rendered by main_table_text.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pandas as pd

from prunebench.report.differences import Difference, avg_acc_difference, ppl_difference
from prunebench.report.format import (AVG_INCONSISTENT, AVG_PARTIAL, AVG_PUBLISHED_ONLY, AVG_ROUNDING,
                                      DENSE_LABEL, DISPLAY_DECIMALS, INTERVAL_MARKERS, Footnote, Marker,
                                      format_number, format_sparsity_label, footnote_order, method_display_name,
                                      method_order, model_display_name, model_order, round_printed,
                                      source_markers, sparsity_label_order, task_display_name)
from prunebench.report.frame import (SEED_SD, carries_item_scores, cell_value, collapse_duplicate_cells,
                                     is_dense, ok_rows, ppl_cell_value, ppl_datasets, ppl_seqlens,
                                     resolve_tasks, seed_count)
from prunebench.report.paper import PERCENT, reference_paper

PPL_COLUMN = "PPL"
AVG_COLUMN = "Avg"
# Sparsity targets closer than this are the same target (labels come from floats).
SPARSITY_MATCH_TOLERANCE = 1e-6
# A value printed with two decimals stands for anything within half a unit of its last digit.
PRINTED_HALF_UNIT = 0.5 * 10 ** -DISPLAY_DECIMALS
# A published average computed from unrounded accuracies, then rounded, can differ from the mean
# of the rounded cells by up to one half unit from the cells plus one from its own rounding.
AVG_ROUNDING_SLACK = 2 * PRINTED_HALF_UNIT


class PaperIndex:
    """Looks up the published row with the same model, method and sparsity as a record."""

    def __init__(self, reference: pd.DataFrame):
        self._rows: dict[tuple[str, str], list[pd.Series]] = {}
        for _, row in ok_rows(reference).iterrows():
            key = (str(row["model"]).lower(), row["method"])
            self._rows.setdefault(key, []).append(row)

    def match(self, row: pd.Series) -> pd.Series | None:
        candidates = self._rows.get((str(row["model"]).lower(), row["method"]), [])
        for candidate in candidates:
            if is_dense(row) and is_dense(candidate):
                return candidate
            same_pattern = row["pattern"] == candidate["pattern"]
            target, published = cell_value(row, "sparsity"), cell_value(candidate, "sparsity")
            if (not is_dense(row) and same_pattern and target is not None and published is not None
                    and abs(target - published) < SPARSITY_MATCH_TOLERANCE):
                return candidate
        return None


@dataclass
class TableCell:
    """One printed number, in display units (percent points for accuracies), with the paper's
    value at the same model / method / sparsity when there is one."""
    value: float | None
    paper: float | None = None
    markers: tuple[Marker, ...] = ()
    difference: Difference | None = None   # against the dense row of the same model
    sd: float | None = None                # sample SD over seeds (two or more seeds)


@dataclass
class TableRow:
    model_id: str
    method: str
    sparsity_label: str
    source: str | None
    method_markers: tuple[Marker, ...]
    cells: dict[str, TableCell]
    n_records: int = 1
    n_seeds: int = 1

    @property
    def model(self) -> str:
        return model_display_name(self.model_id)

    @property
    def method_name(self) -> str:
        return method_display_name(self.method)


@dataclass
class TableBlock:
    sparsity_label: str
    rows: list[TableRow]

    @property
    def title(self) -> str:
        if self.sparsity_label == DENSE_LABEL:
            return "Dense models"
        return f"{format_sparsity_label(self.sparsity_label)} sparsity"


@dataclass
class PaperLayout:
    """The paper's main table: blocks of rows (model x method) per sparsity, columns PPL, tasks,
    Avg, plus footnotes. Built by `paper_layout`, rendered by main_table_text.py and the page."""
    blocks: list[TableBlock]
    columns: list[str]
    tasks: list[str]
    ppl_dataset: str | None
    ppl_seqlens: list[int]
    with_paper: bool
    footnotes: list[Footnote] = field(default_factory=list)
    with_differences: bool = False

    def flagged_rows(self, marker: Marker = AVG_INCONSISTENT) -> list[TableRow]:
        """Rows whose Avg carries `marker`, each once (dense rows repeat across blocks)."""
        seen, flagged = set(), []
        for block in self.blocks:
            for row in block.rows:
                key = (row.model_id, row.method, row.sparsity_label)
                if marker in row.cells["Avg"].markers and key not in seen:
                    seen.add(key)
                    flagged.append(row)
        return flagged


def _average_cell(row: pd.Series, tasks: list[str], paper_row: pd.Series | None,
                  notes: list[Footnote], row_name: str) -> TableCell:
    values = [cell_value(row, f"acc_{task}") for task in tasks]
    present = [value * PERCENT for value in values if value is not None]
    published = cell_value(row, "published_avg")
    published = None if published is None else published * PERCENT
    paper_avg = cell_value(paper_row, "published_avg")
    paper_avg = None if paper_avg is None else paper_avg * PERCENT

    if not present:
        if published is None:
            return TableCell(None, paper_avg)
        return TableCell(published, paper_avg, (AVG_PUBLISHED_ONLY,))
    mean = sum(present) / len(present)
    if len(present) < len(tasks):
        notes.append(Footnote(AVG_PARTIAL, f"{row_name}: Avg over {len(present)} of "
                                           f"{len(tasks)} tasks."))
        return TableCell(mean, paper_avg, (AVG_PARTIAL,))
    if published is None:
        return TableCell(mean, paper_avg)
    # Compare as printed: two decimals each side.
    printed_difference = abs(round_printed(mean) - round_printed(published))
    if printed_difference <= PRINTED_HALF_UNIT:
        return TableCell(mean, paper_avg)
    marker = AVG_INCONSISTENT if abs(mean - published) > AVG_ROUNDING_SLACK else AVG_ROUNDING
    notes.append(Footnote(marker, f"{row_name}: published Avg {format_number(published)}, "
                                  f"mean of its {len(tasks)} cells {format_number(mean)}."))
    return TableCell(mean, paper_avg, (marker,))


def _table_row(row: pd.Series, tasks: list[str], ppl_dataset: str | None,
               paper_row: pd.Series | None, notes: list[Footnote], markers_of_source: dict[str, Marker],
               dense_row: pd.Series | None = None) -> TableRow:
    label = format_sparsity_label(row["sparsity_label"])
    row_name = f"{model_display_name(row['model'])} {method_display_name(row['method'])}, {label}"
    cells: dict[str, TableCell] = {}
    # Differences against the model's dense row, only for pruned rows of frames with item scores.
    compare = dense_row is not None and not is_dense(row)
    if ppl_dataset is not None:
        # The paper's perplexities are on its own text; any other dataset has no paper value.
        paper_ppl = (cell_value(paper_row, f"ppl_{ppl_dataset}")
                     if ppl_dataset == reference_paper().ppl_dataset else None)
        cells[PPL_COLUMN] = TableCell(ppl_cell_value(row, ppl_dataset), paper_ppl,
                                      difference=ppl_difference(row, dense_row, ppl_dataset) if compare else None,
                                      sd=cell_value(row, f"ppl_{ppl_dataset}{SEED_SD}"))
    for task in tasks:
        value = cell_value(row, f"acc_{task}")
        paper_value = cell_value(paper_row, f"acc_{task}")
        sd = cell_value(row, f"acc_{task}{SEED_SD}")
        cells[task_display_name(task)] = TableCell(
            None if value is None else value * PERCENT,
            None if paper_value is None else paper_value * PERCENT, sd=None if sd is None else sd * PERCENT)
    cells[AVG_COLUMN] = _average_cell(row, tasks, paper_row, notes, row_name)
    if compare:
        cells[AVG_COLUMN].difference = avg_acc_difference(row, dense_row, tasks)
    source = row.get("source") if isinstance(row.get("source"), str) else None
    method_markers = (markers_of_source[source],) if source in markers_of_source else ()
    return TableRow(row["model"], row["method"], row["sparsity_label"], source, method_markers,
                    cells, int(row.get("n_records", 1)), seed_count(row))


def _row_sort_key(row: pd.Series) -> tuple:
    return (model_order(row["model"]), method_order(row["method"]))


def _dedupe_notes(notes: Iterable[Footnote]) -> list[Footnote]:
    seen, unique = set(), []
    for note in notes:
        key = (note.marker, note.text)
        if key not in seen:
            seen.add(key)
            unique.append(note)
    return unique


def paper_layout(df: pd.DataFrame, tasks: Sequence[str] | None = None,
                 ppl_dataset: str | None = None,
                 reference: pd.DataFrame | None = None) -> PaperLayout:
    """Arrange records as the paper's main table.

    One block per sparsity label (dense rows repeated in every block), rows ordered by model and
    then `method_order`, columns PPL (`ppl_dataset`, default WikiText-2 when measured), the tasks
    (default: the paper's six) and Avg, the plain mean of the task cells. With `reference` (the
    paper's data), every cell also carries the published value of the same model, method and
    sparsity.
    """
    frame = collapse_duplicate_cells(ok_rows(df))
    tasks = resolve_tasks(frame, tasks)
    datasets = ppl_datasets(frame)
    if ppl_dataset is None:
        ppl_dataset = datasets[0] if datasets else None
    columns = ([PPL_COLUMN] if ppl_dataset else []) + [task_display_name(t) for t in tasks] + [AVG_COLUMN]
    index = PaperIndex(reference) if reference is not None else None
    markers_of_source = source_markers()
    notes: list[Footnote] = []

    ordered = frame.iloc[sorted(range(len(frame)), key=lambda i: _row_sort_key(frame.iloc[i]))] \
        if not frame.empty else frame
    dense = [row for _, row in ordered.iterrows() if is_dense(row)]
    labels = sorted({row["sparsity_label"] for _, row in ordered.iterrows() if not is_dense(row)},
                    key=sparsity_label_order) or ([DENSE_LABEL] if dense else [])

    with_differences = carries_item_scores(frame)
    dense_of = {}
    for row in dense:
        dense_of.setdefault(row["model"], row)
    blocks = []
    for label in labels:
        block_rows = dense + [row for _, row in ordered.iterrows() if row["sparsity_label"] == label
                              and not is_dense(row)]
        block_rows.sort(key=_row_sort_key)
        rows = [_table_row(row, tasks, ppl_dataset, index.match(row) if index else None, notes, markers_of_source,
                           dense_of.get(row["model"]) if with_differences else None)
                for row in block_rows]
        blocks.append(TableBlock(label, rows))

    for block in blocks:
        for row in block.rows:
            if row.n_records > row.n_seeds:
                notes.append(Footnote(None, f"{row.model} {row.method_name}, "
                                            f"{format_sparsity_label(row.sparsity_label)}: mean of "
                                            f"{row.n_records} records of {row.n_seeds} seed(s)."))
    for marker in markers_of_source.values():
        if any(marker in row.method_markers for block in blocks for row in block.rows):
            notes.append(Footnote(marker, marker.meaning + "."))
    if any(AVG_PUBLISHED_ONLY in row.cells[AVG_COLUMN].markers for block in blocks for row in block.rows):
        notes.append(Footnote(AVG_PUBLISHED_ONLY, AVG_PUBLISHED_ONLY.meaning + "."))
    for marker in (AVG_INCONSISTENT, AVG_ROUNDING):
        if any(note.marker is marker for note in notes):
            notes.insert(0, Footnote(marker, marker.meaning + ":"))
    used = {m for block in blocks for row in block.rows
            for cell in row.cells.values() if cell.difference is not None for m in cell.difference.markers}
    notes += [Footnote(marker, marker.meaning + ".") for marker in INTERVAL_MARKERS if marker in used]
    order = footnote_order()
    notes.sort(key=lambda note: order.index(note.marker) if note.marker in order else len(order))

    seqlens = ppl_seqlens(frame, ppl_dataset) if ppl_dataset else []
    return PaperLayout(blocks, columns, tasks, ppl_dataset, seqlens, index is not None,
                       _dedupe_notes(notes), with_differences)
