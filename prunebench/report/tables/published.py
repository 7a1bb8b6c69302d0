"""The tables of papers shown on their own (published/papers.yaml, `tables`): one model's
perplexity and average accuracy per method and sparsity, rebuilt from the published numbers."""
from __future__ import annotations

from prunebench.report.format import format_number, format_sparsity_label, method_display_name
from prunebench.report.paper import PublishedTable, published_tables


def published_table_markdown(table: PublishedTable) -> str:
    lines = [f"## {table.source}: {table.model}, published numbers", "",
             f"| Method | Sparsity | {table.ppl_column} | {table.avg_column} |", "|---|---|---|---|"]
    for row in table.rows:
        lines.append(f"| {method_display_name(row.method)} | {format_sparsity_label(row.sparsity_label)} | "
                     f"{format_number(row.ppl)} | {format_number(row.avg)} |")
    lines += ["", table.note, ""]
    return "\n".join(lines)


def published_tables_markdown() -> list[str]:
    """Each paper's table, in papers.yaml's order."""
    return [published_table_markdown(table) for table in published_tables()]
