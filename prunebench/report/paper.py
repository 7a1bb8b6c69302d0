"""The LEAP paper's published numbers, kept as reference data for the report layer.

Source: "LEAP: Learnable End-to-End Adaptive Pruning of Large Language Models", arXiv 2605.17289
(2026), main table (WikiText-2 perplexity and six zero-shot accuracies at 50% and 60%
unstructured sparsity) and the Llama-3.1 8B perplexity / average line; plus the Wanda and
SparseGPT perplexity / average rows that the same group's OPTIMA study reports for the same dense
models (LEAP did not publish those rows in a recoverable form). Transcribed from
../shared/LEAP.md, section 4.

Accuracy convention of the whole report layer: every DataFrame holds accuracies as fractions in
[0, 1] (the run records' convention, `acc_<task>` and `published_avg` alike); rendered tables,
plots and gain figures show percent points. The transcription below is in percent exactly as the
paper prints it, so that it can be checked against the paper by eye; `paper_reference_frame`
converts it.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pandas as pd
from prunebench import registry
from prunebench.engines import allocation as allocations
from prunebench.data.windows import is_text_path

PAPER_ARXIV_ID = "2605.17289"
PAPER_SOURCE = f"LEAP (arXiv {PAPER_ARXIV_ID})"
SIBLING_STUDY_SOURCE = "OPTIMA (sibling study)"
# Thanos in the LEAP group's protocol (128 C4 x 2048 calibration, WikiText-2, six-task average), as
# transcribed in ../shared/BASELINES.md: rows the LEAP paper's sweep ran but printed only this way.
THANOS_SWEEP_SOURCE = "Thanos in the LEAP group's sweep"

# The paper's six lm-eval tasks (metric `acc` for all), in the paper's column order.
PAPER_TASKS = ["mmlu", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa"]
TASK_DISPLAY_NAMES = {
    "mmlu": "MMLU",
    "piqa": "PIQA",
    "arc_easy": "ARC-E",
    "arc_challenge": "ARC-C",
    "winogrande": "Wino",
    "openbookqa": "OBQA",
}

# The paper reports WikiText-2 perplexity. Its window length is not stated alongside the numbers:
# the authors' code uses 4096-token windows while the dense values look like 2048-token ones, so
# the reference data leaves the window unknown rather than guess.
PAPER_PPL_DATASET = "wikitext2"
PAPER_PATTERN = "unstructured"
PAPER_SPARSITIES = (0.5, 0.6)

# Paper display name -> HF model id, in the order the report lists them (the main table's
# alphabetical order, then the 8B model that only appears in the PPL / Avg line).
PAPER_MODEL_IDS = {
    "Gemma-3 1B": "google/gemma-3-1b-pt",
    "LLaMA-3.2 1B": "meta-llama/Llama-3.2-1B",
    "LLaMA-3.2 3B": "meta-llama/Llama-3.2-3B",
    "Qwen-2.5 0.5B": "Qwen/Qwen2.5-0.5B",
    "Llama-3.1 8B": "meta-llama/Llama-3.1-8B",
}
MODEL_DISPLAY_NAMES = {model_id: name for name, model_id in PAPER_MODEL_IDS.items()}
MODEL_FAMILIES = {
    "google/gemma-3-1b-pt": "gemma3",
    "meta-llama/Llama-3.2-1B": "llama",
    "meta-llama/Llama-3.2-3B": "llama",
    "Qwen/Qwen2.5-0.5B": "qwen2",
    "meta-llama/Llama-3.1-8B": "llama",
}

# The method the LEAP paper is about, and the baseline of its headline claim (LEAP minus ADMM).
PAPER_METHOD = "leap"
PAPER_BASELINE = "admm"

# The paper's headline claim: LEAP minus ADMM on the six-task average, in percent points, over the
# 10 (model, sparsity) pairs of the four small models and Llama-3.1 8B at 50% and 60%.
PAPER_HEADLINE_GAIN = {"0.5": 1.35, "0.6": 3.83, "all": 2.59}

DENSE = 0.0

# LEAP main table, percent as printed: model, method, sparsity, PPL, MMLU, PIQA, ARC-E, ARC-C,
# Wino, OBQA, published Avg. Dense rows appear once; they belong to every sparsity block.
_MAIN_TABLE = [
    ("Gemma-3 1B", "dense", DENSE, 14.17, 24.95, 74.81, 71.93, 35.41, 58.72, 28.80, 49.10),
    ("Gemma-3 1B", "admm", 0.5, 26.63, 24.05, 70.08, 63.80, 27.73, 56.51, 25.20, 44.56),
    # Published Avg 44.93; the mean of its six cells is 44.89 (kept as printed, flagged by tables).
    ("Gemma-3 1B", "leap", 0.5, 11.89, 23.80, 71.27, 63.13, 27.90, 60.03, 23.20, 44.93),
    ("LLaMA-3.2 1B", "dense", DENSE, 9.75, 36.92, 74.27, 65.53, 31.31, 60.30, 26.20, 49.09),
    ("LLaMA-3.2 1B", "admm", 0.5, 17.35, 27.92, 69.75, 56.06, 26.37, 56.04, 22.20, 43.05),
    ("LLaMA-3.2 1B", "leap", 0.5, 11.29, 27.39, 71.98, 60.90, 28.24, 57.53, 22.80, 44.81),
    ("LLaMA-3.2 3B", "dense", DENSE, 7.81, 54.13, 76.55, 74.28, 42.75, 69.38, 30.60, 57.95),
    ("LLaMA-3.2 3B", "admm", 0.5, 11.61, 42.90, 74.48, 66.62, 34.56, 66.93, 28.20, 52.28),
    ("LLaMA-3.2 3B", "leap", 0.5, 8.67, 44.55, 75.19, 71.09, 39.33, 67.48, 29.00, 54.44),
    ("Qwen-2.5 0.5B", "dense", DENSE, 13.08, 47.36, 69.97, 64.18, 29.18, 55.80, 24.40, 48.48),
    ("Qwen-2.5 0.5B", "admm", 0.5, 19.70, 29.38, 65.67, 55.89, 25.26, 56.27, 21.20, 42.28),
    ("Qwen-2.5 0.5B", "leap", 0.5, 14.09, 34.37, 68.44, 61.99, 26.11, 55.25, 21.00, 44.53),
    ("Gemma-3 1B", "admm", 0.6, 50.55, 25.16, 65.29, 55.89, 22.69, 53.82, 19.60, 40.41),
    ("Gemma-3 1B", "leap", 0.6, 13.16, 24.44, 68.66, 60.61, 25.09, 58.64, 23.00, 43.41),
    ("LLaMA-3.2 1B", "admm", 0.6, 33.87, 25.77, 64.15, 47.22, 22.44, 54.62, 18.20, 38.73),
    ("LLaMA-3.2 1B", "leap", 0.6, 13.06, 24.90, 69.70, 57.53, 25.60, 55.80, 21.00, 42.42),
    ("LLaMA-3.2 3B", "admm", 0.6, 19.14, 33.46, 69.15, 57.70, 27.39, 59.82, 22.40, 44.99),
    ("LLaMA-3.2 3B", "leap", 0.6, 9.77, 37.55, 74.32, 66.50, 34.81, 63.14, 26.00, 50.39),
    ("Qwen-2.5 0.5B", "admm", 0.6, 33.41, 24.22, 62.40, 50.13, 22.44, 52.96, 17.80, 38.33),
    ("Qwen-2.5 0.5B", "leap", 0.6, 15.66, 24.66, 67.90, 56.69, 25.09, 55.49, 19.40, 41.53),
]

# Rows published only as WikiText-2 PPL / six-task Avg (percent): model, method, sparsity, PPL,
# Avg, source. The Llama-3.1 8B line is LEAP's; the Wanda / SparseGPT rows of the small models
# come from the OPTIMA study of the same group, which shares LEAP's dense rows.
_PPL_AVG_ONLY = [
    ("Llama-3.1 8B", "dense", DENSE, 5.84, 63.89, PAPER_SOURCE),
    ("Llama-3.1 8B", "wanda", 0.5, 9.64, 55.81, PAPER_SOURCE),
    ("Llama-3.1 8B", "sparsegpt", 0.5, 9.30, 57.33, PAPER_SOURCE),
    ("Llama-3.1 8B", "admm", 0.5, 9.12, 57.50, PAPER_SOURCE),
    ("Llama-3.1 8B", "leap", 0.5, 7.66, 57.71, PAPER_SOURCE),
    ("Llama-3.1 8B", "admm", 0.6, 14.10, 50.61, PAPER_SOURCE),
    ("Llama-3.1 8B", "leap", 0.6, 8.82, 54.47, PAPER_SOURCE),
    ("LLaMA-3.2 3B", "wanda", 0.5, 12.92, 49.95, SIBLING_STUDY_SOURCE),
    ("LLaMA-3.2 3B", "sparsegpt", 0.5, 12.32, 50.20, SIBLING_STUDY_SOURCE),
    ("LLaMA-3.2 3B", "wanda", 0.6, 31.13, 38.77, SIBLING_STUDY_SOURCE),
    ("LLaMA-3.2 3B", "sparsegpt", 0.6, 22.00, 43.78, SIBLING_STUDY_SOURCE),
    ("Gemma-3 1B", "wanda", 0.5, 32.96, 42.21, SIBLING_STUDY_SOURCE),
    ("Gemma-3 1B", "sparsegpt", 0.5, 28.34, 43.03, SIBLING_STUDY_SOURCE),
    ("Gemma-3 1B", "wanda", 0.6, 90.48, 36.63, SIBLING_STUDY_SOURCE),
    ("Gemma-3 1B", "sparsegpt", 0.6, 60.91, 38.60, SIBLING_STUDY_SOURCE),
    ("Qwen-2.5 0.5B", "wanda", 0.5, 24.00, 41.71, SIBLING_STUDY_SOURCE),
    ("Qwen-2.5 0.5B", "sparsegpt", 0.5, 20.33, 41.93, SIBLING_STUDY_SOURCE),
    ("Qwen-2.5 0.5B", "wanda", 0.6, 83.42, 34.66, SIBLING_STUDY_SOURCE),
    ("Qwen-2.5 0.5B", "sparsegpt", 0.6, 40.56, 37.29, SIBLING_STUDY_SOURCE),
    ("LLaMA-3.2 1B", "wanda", 0.6, 71.53, 33.92, SIBLING_STUDY_SOURCE),
    ("LLaMA-3.2 1B", "sparsegpt", 0.6, 48.00, 36.64, SIBLING_STUDY_SOURCE),
    ("Qwen-2.5 0.5B", "thanos", 0.5, 20.85, 42.10, THANOS_SWEEP_SOURCE),
    ("Qwen-2.5 0.5B", "thanos", 0.6, 44.29, 37.64, THANOS_SWEEP_SOURCE),
    ("Llama-3.1 8B", "thanos", 0.5, 9.27, 57.64, THANOS_SWEEP_SOURCE),
    ("Llama-3.1 8B", "thanos", 0.6, 15.91, 49.43, THANOS_SWEEP_SOURCE),
]

PERCENT = 100.0


def sparsity_label(sparsity: float, method: str) -> str:
    """The run records' label for an unstructured target: "dense", or the fraction ("0.5")."""
    if method == "dense":
        return "dense"
    return f"{sparsity:g}"


def _reference_row(display_name: str, method: str, sparsity: float, ppl: float,
                   accuracies_percent: dict[str, float], avg_percent: float, source: str) -> dict:
    model_id = PAPER_MODEL_IDS[display_name]
    row = {
        "model": model_id,
        "family": MODEL_FAMILIES[model_id],
        "method": method,
        "sparsity": sparsity,
        "pattern": PAPER_PATTERN,
        "sparsity_label": sparsity_label(sparsity, method),
        # The paper reports targets only; the achieved sparsity of its masks is not published.
        "achieved_sparsity": math.nan,
        "status": "ok",
        f"ppl_{PAPER_PPL_DATASET}": ppl,
        f"ppl_{PAPER_PPL_DATASET}_seqlen": pd.NA,
    }
    for task in PAPER_TASKS:
        value = accuracies_percent.get(task)
        row[f"acc_{task}"] = math.nan if value is None else value / PERCENT
        row[f"stderr_{task}"] = math.nan
    row["published_avg"] = avg_percent / PERCENT
    row["source"] = source
    return row


def paper_reference_frame(include_sibling_study: bool = True) -> pd.DataFrame:
    """The published numbers as a DataFrame in the run-record column convention.

    Accuracies (`acc_<task>`, `published_avg`) are fractions; `ppl_wikitext2_seqlen` is missing
    (not stated by the paper); `source` names the publication of each row. Rows that were only
    published as PPL / Avg have NaN task cells.
    """
    rows = []
    for display_name, method, sparsity, ppl, *cells, avg in _MAIN_TABLE:
        rows.append(_reference_row(display_name, method, sparsity, ppl,
                                   dict(zip(PAPER_TASKS, cells)), avg, PAPER_SOURCE))
    for display_name, method, sparsity, ppl, avg, source in _PPL_AVG_ONLY:
        if source == SIBLING_STUDY_SOURCE and not include_sibling_study:
            continue
        rows.append(_reference_row(display_name, method, sparsity, ppl, {}, avg, source))
    frame = pd.DataFrame(rows)
    frame[f"ppl_{PAPER_PPL_DATASET}_seqlen"] = frame[f"ppl_{PAPER_PPL_DATASET}_seqlen"].astype("Int64")
    return frame


def model_display_name(model_id: str) -> str:
    """The paper's name for a model it evaluated, else the id itself."""
    for known_id, name in MODEL_DISPLAY_NAMES.items():
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
    return TASK_DISPLAY_NAMES.get(task, task)


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


# ---------------------------------------------------------------------------------------------
# The PATCH paper (Hourri, Mozaffari, Mehri Dehnavi, arXiv 2509.23410): Qwen-2.5 0.5B, WikiText-2
# perplexity and the 8-task average accuracy (percent), as published (../shared/METHODS.md
# section 2, ../shared/LEAP.md section 5).  Wanda 2:4's average is not given there.

PATCH_ARXIV_ID = "2509.23410"
PATCH_SOURCE = f"PATCH (arXiv {PATCH_ARXIV_ID})"
PATCH_MODEL = "Qwen-2.5 0.5B"
# (method, spec label as prunebench writes it, WikiText-2 ppl, average accuracy or None)
PATCH_TABLE = (
    ("dense", "dense", 12.08, 46.00),
    ("patch", "hybrid:0.25/128", 13.47, 42.39),
    ("patch", "hybrid:0.35/128", 13.84, 41.15),
    ("patch", "hybrid:0.45/128", 14.57, 40.29),
    ("maskllm", "2:4", 15.22, 39.33),
    ("sparsegpt", "2:4", 36.59, 34.81),
    ("wanda", "2:4", 72.48, None),
    ("thanos", "2:4", 37.32, None),  # ppl only in ../shared/BASELINES.md
    ("proxsparse", "2:4", 111.05, 32.05),  # worse than SparseGPT 2:4 on this small model
)


def patch_paper_markdown() -> str:
    """The PATCH paper's Qwen-2.5 0.5B table, rebuilt from its published numbers."""
    from .tables import format_number, format_sparsity_label

    lines = [f"## {PATCH_SOURCE}: {PATCH_MODEL}, published numbers", "",
             "| Method | Sparsity | WikiText-2 PPL | Avg acc (8 tasks, %) |", "|---|---|---|---|"]
    for method, label, ppl, avg in PATCH_TABLE:
        lines.append(f"| {method_display_name(method)} | {format_sparsity_label(label)} | {format_number(ppl)} | "
                     f"{format_number(avg)} |")
    lines += ["", "PATCH's sparsity is the effective one (half the weights of its 2:4 tiles; 128 x 128 tiles). "
              "Wanda 2:4's and Thanos 2:4's averages are not published there.", ""]
    return "\n".join(lines)
