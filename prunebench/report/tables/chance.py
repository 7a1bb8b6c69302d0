"""Which zero-shot tasks the dense model scores near chance on, per model.

Pruning moves accuracy down towards chance, so a task on which the dense model itself is
indistinguishable from guessing cannot separate methods: any difference there is noise. The
record carries each multiple-choice task's chance level (the mean odds of guessing among each
scored item's choices) and the accuracy's standard error; a task is marked when the dense
model's 95% interval reaches chance. A record without a chance level (older, or not multiple
choice) has no row here.
"""
from __future__ import annotations

import pandas as pd
from tabulate import tabulate

Z95 = 1.959964  # two-sided 95% normal quantile


def near_chance_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task) with a dense record and a chance level: accuracy, its 95%
    half-width, chance, headroom (accuracy - chance) and `near_chance`."""
    rows = []
    dense = frame[frame["method"] == "dense"] if "method" in frame else frame.iloc[0:0]
    for _, row in dense.iterrows():
        for column in row.index:
            if not column.startswith("chance_"):
                continue
            task = column[len("chance_"):]
            chance, acc, stderr = row.get(column), row.get(f"acc_{task}"), row.get(f"stderr_{task}")
            if not all(isinstance(v, (int, float)) and v == v for v in (chance, acc, stderr)):
                continue
            half = Z95 * stderr
            rows.append({"model": row["model"], "task": task, "n": row.get(f"n_{task}"), "dense_acc": acc,
                         "half_width": half, "chance": chance, "headroom": acc - chance,
                         "near_chance": acc - half <= chance})
    return pd.DataFrame(rows, columns=["model", "task", "n", "dense_acc", "half_width", "chance", "headroom",
                                       "near_chance"]).drop_duplicates(["model", "task"])


def render_markdown(near: pd.DataFrame) -> str:
    table = [[r.model, r.task, r.n, f"{100 * r.dense_acc:.2f} ± {100 * r.half_width:.2f}", f"{100 * r.chance:.2f}",
              f"{100 * r.headroom:+.2f}", "**near chance**: cannot separate methods" if r.near_chance else "above chance"]
             for r in near.itertuples()]
    head = ["Model", "Task", "Items", "Dense acc % (95%)", "Chance %", "Headroom (points)", ""]
    note = ("A task is near chance when the dense model's 95% interval reaches the accuracy of guessing "
            "among each item's choices; pruned models can only move towards it, so differences between "
            "methods on such a task are noise.")
    return tabulate(table, headers=head, tablefmt="github") + "\n\n" + note + "\n"
