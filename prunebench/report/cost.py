"""The cost of each cell's mask beside its quality: a table (CSV, markdown) and quality-vs-bytes
and quality-vs-latency plots with the Pareto front, from a results directory's records
(prunebench.measure.cost does the arithmetic, prunebench.measure.speed the timing; this module loads each model
once and writes the files).

Speed is measured on demand (`prunebench cost --results DIR --speed`, minutes on a CPU) into
report/speed.csv, keyed by record; later cost tables pick it up for the records it names."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from prunebench.measure import cost as costs
from prunebench.store.atomic import write_text_atomic
from prunebench.report.format import (dataset_display_name, dataset_file_label, format_sparsity_label,
                                      method_display_name, method_order, model_display_name, sparsity_label_order)
from prunebench.report.plots import DEFAULT_FORMATS, LINE_FIGURE_SIZE, _new_figure, _save, _slug
from prunebench.modeling.models import all_prunable, load_model, weight_matrix
from prunebench.measure import speed
from prunebench.progress import progress_bar
from prunebench.run.runner import environment

COST_CSV = "cost.csv"
COST_MARKDOWN = "cost.md"
SPEED_CSV = "speed.csv"
MB = 1e6


def model_shapes(model_id: str) -> tuple:
    """({linear: (rows, cols)}, ModelShape) of a model spec, loading it once."""
    loaded = load_model(model_id)
    shapes = {name: tuple(weight_matrix(m).shape) for name, m in all_prunable(loaded.model).items()}
    return shapes, costs.model_shape(loaded.model)


def cost_frame(records: list, *, context: int = costs.DEFAULT_CONTEXT, value_dtype: str = costs.DEFAULT_VALUE_DTYPE,
               shapes_of=model_shapes) -> pd.DataFrame:
    """One row per ok record: bytes (linears and whole model, smallest valid format), FLOPs per
    token, their ratios to dense, the formats chosen, and the record's perplexities."""
    value_bytes = costs.VALUE_BYTES[value_dtype]
    cache, rows = {}, []
    for record in records:
        if record.get("status") != "ok":
            continue
        model = record["model"]["id"]
        stored = record.get("cost") or {}
        if stored.get("value_dtype") == value_dtype and stored.get("context") == context:
            total = stored  # measured from the pruned weights' zeros when the cell ran
        else:  # an older record, or other settings: from its per-layer sparsity
            if model not in cache:
                cache[model] = shapes_of(model)
            shapes, shape = cache[model]
            total = costs.model_cost(costs.record_linears(record, shapes, value_bytes), shape, context=context,
                                     value_dtype=value_dtype)
        sp = record.get("sparsity") or {}
        row = {"key": record.get("key"), "model": model, "method": record["method"]["name"], "sparsity_label": sp.get("label"),
               "pattern": sp.get("pattern"), "achieved_sparsity": sp.get("achieved"),
               "linear_mb": total["linear_bytes"] / MB, "model_mb": total["model_bytes"] / MB,
               "linear_ratio": total["linear_ratio"], "model_ratio": total["model_ratio"],
               "gflops_per_token": total["flops_per_token"] / 1e9, "flops_ratio": total["flops_ratio"],
               "formats": ", ".join(f"{k} x{v}" for k, v in sorted(total["formats"].items())),
               "value_dtype": value_dtype, "context": context}
        for ds, v in ((record.get("eval") or {}).get("perplexity") or {}).items():
            row[f"ppl_{ds}"] = v.get("value")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame.loc[frame["method"] == "dense", "sparsity_label"] = "dense"
    order = sorted(range(len(frame)), key=lambda i: (frame["model"].iat[i], method_order(frame["method"].iat[i]),
                                                     sparsity_label_order(str(frame["sparsity_label"].iat[i]))))
    return frame.iloc[order].reset_index(drop=True)


def pareto_front(frame: pd.DataFrame, cost_column: str, quality_column: str) -> pd.Series:
    """True for the rows no other row beats on both cost and quality (lower is better for both)."""
    front = []
    for i in range(len(frame)):
        c, q = frame[cost_column].iat[i], frame[quality_column].iat[i]
        dominated = ((frame[cost_column] <= c) & (frame[quality_column] <= q)
                     & ((frame[cost_column] < c) | (frame[quality_column] < q))).any()
        front.append(not dominated and pd.notna(q))
    return pd.Series(front, index=frame.index)


def render_cost_markdown(frame: pd.DataFrame, ppl_column: str | None) -> str:
    if frame.empty:
        return "No ok records to cost.\n"
    timed = "best_tokens_per_s" in frame.columns
    head = ["Model", "Method", "Sparsity", "achieved"] + (["PPL"] if ppl_column else []) + [
        "linears MB", "model MB", "vs dense", "GFLOP/token", "vs dense"] + (
        ["decode tok/s", "vs dense kernels"] if timed else []) + ["formats"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in frame.iterrows():
        cells = [model_display_name(r["model"]), method_display_name(r["method"]),
                 format_sparsity_label(str(r["sparsity_label"])), f"{(r['achieved_sparsity'] or 0):.4f}"]
        if ppl_column:
            value = r.get(ppl_column)
            cells.append("-" if value is None or pd.isna(value) else f"{value:.2f}")
        cells += [f"{r['linear_mb']:.1f}", f"{r['model_mb']:.1f}", f"{r['model_ratio']:.3f}x",
                  f"{r['gflops_per_token']:.3f}", f"{r['flops_ratio']:.3f}x"]
        if timed:
            measured = pd.notna(r.get("best_tokens_per_s"))
            cells += [f"{r['best_tokens_per_s']:.1f}" if measured else "-", f"{r['speedup']:.2f}x" if measured else "-"]
        cells.append(r["formats"])
        lines.append("| " + " | ".join(cells) + " |")
    first = frame.iloc[0]
    lines += ["", f"Bytes: the smallest valid storage format of each linear (values in {first['value_dtype']}; "
              "dense, bitmask + values, CSR with int32 indices, N:M packed, or dense|2:4 tiles), plus every other "
              f"parameter dense; FLOPs per token at a context of {first['context']} (2 per kept weight, the output head, "
              "attention). Arithmetic from each record's per-layer sparsity (prunebench/measure/cost.py)."]
    if timed:
        t = frame.dropna(subset=["best_tokens_per_s"]).iloc[0]
        lines.append(f"Speed (measured, {SPEED_CSV}): greedy decoding of {int(t['tokens'])} tokens at batch 1 after a "
                     f"{int(t['prompt_tokens'])}-token prompt, median of {int(t['repeats'])}, {int(t['threads'])} "
                     f"thread(s) on {t['cpu']}; each linear on the fastest of dense, torch CSR/BSR and scipy CSR for "
                     "its weight, masks drawn with the record's per-linear kept counts and pattern at random positions "
                     "(prunebench/measure/speed.py); `vs dense kernels`: the same model on dense matmuls (below 1: slower).")
    else:
        lines.append("Speed: not measured for these records (`prunebench cost --results DIR --speed`).")
    return "\n".join(lines) + "\n"


COST_AXES = {"model_mb": "model size (MB, smallest valid format)",
             "ms_per_token": "decode latency (ms/token, batch 1, fastest kernel per linear, measured)"}


def plot_quality_vs_cost(frame: pd.DataFrame, ppl_column: str, path, formats: Sequence[str] = DEFAULT_FORMATS,
                         cost_column: str = "model_mb"):
    if cost_column not in frame.columns:
        return []
    rows = frame.dropna(subset=[ppl_column, cost_column])
    if rows.empty:
        return []
    figure = _new_figure(LINE_FIGURE_SIZE)
    axes = figure.add_subplot()
    front = pareto_front(rows, cost_column, ppl_column)
    for method in sorted(rows["method"].unique(), key=method_order):
        mine = rows[rows["method"] == method]
        axes.scatter(mine[cost_column], mine[ppl_column], label=method_display_name(method), s=24)
    on_front = rows[front].sort_values(cost_column)
    axes.step(on_front[cost_column], on_front[ppl_column], where="post", color="black", linewidth=0.8,
              alpha=0.6, label="Pareto front")
    if rows[ppl_column].max() / max(rows[ppl_column].min(), 1e-9) > 10:
        axes.set_yscale("log")
    axes.set_xlabel(COST_AXES[cost_column])
    axes.set_ylabel(f"perplexity, {dataset_display_name(ppl_column[4:])}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
    return _save(figure, path, formats)


def write_cost_report(records: list, out_dir, *, context: int = costs.DEFAULT_CONTEXT,
                      value_dtype: str = costs.DEFAULT_VALUE_DTYPE, shapes_of=model_shapes) -> tuple:
    """cost.csv, cost.md and quality_vs_cost__<model>__<ppl>.png under out_dir; returns (markdown, paths)."""
    out = Path(out_dir)
    frame = with_speed(cost_frame(records, context=context, value_dtype=value_dtype, shapes_of=shapes_of),
                       out / SPEED_CSV)
    ppl_columns = [c for c in frame.columns if c.startswith("ppl_")]
    ppl_column = ppl_columns[0] if ppl_columns else None
    text = render_cost_markdown(frame, ppl_column)
    write_text_atomic(out / COST_CSV, frame.to_csv(index=False))
    write_text_atomic(out / COST_MARKDOWN, "# Cost of each mask\n\n" + text)
    written = [out / COST_CSV, out / COST_MARKDOWN]
    if ppl_column and not frame.empty:
        for model in frame["model"].unique():
            mine = frame[frame["model"] == model]
            written += plot_quality_vs_cost(mine, ppl_column, out / f"quality_vs_cost__{_slug(model)}__{dataset_file_label(ppl_column[4:])}")
            written += plot_quality_vs_cost(mine, ppl_column, out / f"quality_vs_latency__{_slug(model)}__{dataset_file_label(ppl_column[4:])}",
                                            cost_column="ms_per_token")
    return text, written


SPEED_COLUMNS = ("best_tokens_per_s", "dense_tokens_per_s", "speedup", "ms_per_token", "dense_ms_per_token",
                 "kernels", "tokens", "prompt_tokens", "repeats", "threads", "cpu", "torch")


def with_speed(frame: pd.DataFrame, speed_csv: Path) -> pd.DataFrame:
    """The cost frame with the measured speed of the records speed.csv names (by record key)."""
    if frame.empty or not Path(speed_csv).is_file():
        return frame
    speed = pd.read_csv(speed_csv)
    keep = ["key"] + [c for c in SPEED_COLUMNS if c in speed.columns]
    return frame.merge(speed[keep], on="key", how="left")


def speed_frame(records: list, *, measure=None, load=None, progress: bool = True) -> pd.DataFrame:
    """Measured decode speed of every ok record (prunebench.measure.speed), one model load per model;
    records with the same per-linear kept counts and pattern share one measurement."""
    import torch


    measure = measure or speed.measure
    load = load or (lambda model_id: load_model(model_id).model)
    loaded, measured, rows = {}, {}, []
    todo = [r for r in records if r.get("status") == "ok"]
    bar = progress_bar(total=len(todo), desc="speed", enabled=progress, unit="cell")
    for record in todo:
        bar.update()
        model_id = record["model"]["id"]
        if model_id not in loaded:
            model = load(model_id)
            modules = all_prunable(model)
            dense = {n: weight_matrix(m).detach().clone() for n, m in modules.items()}
            shapes = {n: tuple(w.shape) for n, w in dense.items()}
            loaded[model_id] = (model, modules, dense, shapes)
        model, modules, dense, shapes = loaded[model_id]
        linears = costs.record_linears(record, shapes)
        fingerprint = (model_id, tuple((c.name, c.kept, c.pattern, c.nm, c.tile) for c in linears))
        if fingerprint not in measured:
            masks = speed.masks_like(linears)
            with torch.no_grad():
                for name, module in modules.items():
                    weight_matrix(module).copy_(dense[name] * masks[name].to(dense[name].dtype))
            try:
                measured[fingerprint] = measure(model)
            finally:
                with torch.no_grad():
                    for name, module in modules.items():
                        weight_matrix(module).copy_(dense[name])
        result = dict(measured[fingerprint])
        result["kernels"] = ", ".join(f"{k} x{v}" for k, v in result["kernels"].items())
        sp = record.get("sparsity") or {}
        rows.append({"key": record.get("key"), "model": model_id, "method": record["method"]["name"],
                     "sparsity_label": sp.get("label"), **result, "cpu": environment("cpu").get("cpu")})
    bar.close()
    return pd.DataFrame(rows)


def write_speed_report(records: list, out_dir, *, context: int = costs.DEFAULT_CONTEXT,
                       value_dtype: str = costs.DEFAULT_VALUE_DTYPE, progress: bool = True, **kw) -> tuple:
    """Measure every record's speed into speed.csv, then rewrite the cost table and plots with it."""
    out = Path(out_dir)
    frame = speed_frame(records, progress=progress, **kw)
    write_text_atomic(out / SPEED_CSV, frame.to_csv(index=False))
    text, written = write_cost_report(records, out, context=context, value_dtype=value_dtype)
    return text, [out / SPEED_CSV] + written
