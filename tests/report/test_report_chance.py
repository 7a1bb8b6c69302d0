"""The report marks the zero-shot tasks a model's dense accuracy cannot tell from guessing."""
import pandas as pd

from prunebench.report.tables.chance import near_chance_frame, render_markdown


def _frame():
    return pd.DataFrame([
        # MMLU at 26% of 1000 items (95% half-width 2.7 points) against 25% chance: near chance
        {"model": "m", "method": "dense", "acc_mmlu": 0.26, "stderr_mmlu": 0.0139, "n_mmlu": 1000, "chance_mmlu": 0.25,
         "acc_piqa": 0.62, "stderr_piqa": 0.0343, "n_piqa": 200, "chance_piqa": 0.5,
         "acc_lambada": 0.3, "stderr_lambada": 0.03, "n_lambada": 200, "chance_lambada": None},
        {"model": "m", "method": "wanda", "acc_mmlu": 0.24, "stderr_mmlu": 0.0135, "n_mmlu": 1000, "chance_mmlu": 0.25},
    ])


def test_a_task_whose_dense_interval_reaches_chance_is_marked():
    near = near_chance_frame(_frame()).set_index("task")
    assert set(near.index) == {"mmlu", "piqa"}  # no chance level (not multiple choice): no row
    assert near.loc["mmlu", "near_chance"] and not near.loc["piqa", "near_chance"]
    assert abs(near.loc["piqa", "headroom"] - 0.12) < 1e-12
    text = render_markdown(near.reset_index())
    assert "**near chance**" in text and "above chance" in text


def test_records_without_chance_levels_give_no_rows():
    frame = _frame().drop(columns=["chance_mmlu", "chance_piqa", "chance_lambada"])
    assert near_chance_frame(frame).empty
