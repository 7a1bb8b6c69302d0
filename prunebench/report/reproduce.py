"""`prunebench reproduce`: does a fresh run reproduce a reference run (the committed results/)?

Cells are matched by (model id, method, sparsity label), and within a cell by seed. A fresh
figure reproduces when it lies within the reference's seed noise:

    |fresh - reference mean over seeds| <= max(SD_MULTIPLE x reference seed SD, floor)

floor: PPL_REL_TOL x the reference mean for perplexity, ACC_ABS_TOL (exact) for accuracy. A
reference cell with one seed (a seed-invariant cell such as dense or magnitude, or a calibrated
cell run with one seed) has no spread, so the floor alone applies. Then the verdicts: every pair
of methods the reference finds significantly different (two-level bootstrap interval excludes
zero) must keep its order in the fresh run, and where the fresh run has the seeds to judge it
(no side that depends on the seed with one seed only) the significance must match too.

Masks are compared by sha256 against the reference's record of the same seed and reported
apart from the verdict: identical (what the same code gives on the same CPU), or "within seed
noise" when they differ but every figure reproduces (another CPU rounds float32 sums otherwise
and near-tie mask choices flip). A differing key is flagged (the two cells were not computed
with the same settings) but the figures are still compared.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from prunebench.errors import UserError
from prunebench.store.records import atomic_write_json, atomic_write_text, load_records
from prunebench.store.records import records_frame
from prunebench.report.differences import EVAL_ONLY
from prunebench.report.tables.comparisons import comparisons_frame

REPORT_DIR = "report"
JSON_NAME = "reproduction.json"
MD_NAME = "reproduction.md"
UNKNOWN = "unknown"

# The floors, for cells without a seed spread. The same cell run twice on one machine gives
# bit-identical figures, so a floor only has to absorb summation order where no mask moves:
# measured, magnitude 0.5 recomputed in a fresh venv on another VM, with per-window float64 NLL
# sums instead of float32 batch sums, gave 456.1232 vs 456.1265 (7.3e-6 relative, same
# accuracy). 1e-3 relative is >100x that. Accuracy is a count of items: one item flipping in a
# seed-invariant cell is a real change, so it must be equal (the float tolerance absorbs the
# division).
PPL_REL_TOL = 1e-3
ACC_ABS_TOL = 1e-9
# A calibrated cell's figures move with the calibration draw by far more than rounding: the
# committed 3-seed reference shows seed SDs of 0.5-3% in perplexity (results/report/seeds.md).
# 3 SD: a fresh seed on another CPU lies inside it; a changed method (Wanda's score exponent
# 1 -> 2, tests/slow/test_fresh_within_seed_noise.py) lies far outside.
SD_MULTIPLE = 3.0


@dataclass(frozen=True)
class Tolerance:
    ppl_rel: float = PPL_REL_TOL
    acc_abs: float = ACC_ABS_TOL
    sd_multiple: float = SD_MULTIPLE


def _cell_id(rec: dict) -> tuple[str, str, str]:
    return (str((rec.get("model") or {}).get("id")), str((rec.get("method") or {}).get("name")),
            str((rec.get("sparsity") or {}).get("label")))


def _seed(rec: dict) -> int:
    value = rec.get("seed", (rec.get("spec") or {}).get("seed", 0))
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _pick(records: list[dict], other_keys: set[str]) -> dict:
    """One record per cell and seed: one whose key the other side also has, else ok before
    failed, newest."""
    return max(records, key=lambda r: (r.get("key") in other_keys, r.get("status") == "ok",
                                       str(r.get("created_at") or "")))


def _group(records: list[dict]) -> dict[tuple, dict[int, list[dict]]]:
    """cell id -> seed -> records."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in records:
        groups.setdefault(_cell_id(r), {}).setdefault(_seed(r), []).append(r)
    return groups


def _figure(v: dict, kind: str) -> dict:
    value, diverged = v.get("value"), bool(v.get("diverged"))
    if isinstance(value, (int, float)) and not math.isfinite(value):
        value, diverged = None, True  # an older record holding inf/NaN: diverged, and keeps the JSON strict
    return {"value": value, "diverged": diverged, "kind": kind}


def _figures(rec: dict) -> dict[str, dict]:
    """metric -> {"value": float | None, "diverged": bool, "kind": "ppl" | "acc"}."""
    ev = rec.get("eval") or {}
    out = {}
    for ds, v in (ev.get("perplexity") or {}).items():
        if isinstance(v, dict):
            out[f"ppl:{ds}"] = _figure(v, "ppl")
    for task, v in (ev.get("zeroshot") or {}).items():
        if isinstance(v, dict):
            out[f"acc:{task}"] = _figure(v, "acc")
    return out


def _masks_identical(fresh: dict, ref: dict):
    a = (fresh.get("sparsity") or {}).get("mask_sha256")
    b = (ref.get("sparsity") or {}).get("mask_sha256")
    if not a or not b:
        return UNKNOWN
    return a == b


def _reference_spread(figures: list[dict]) -> dict:
    """mean, sample SD (None below two seeds) and seed count of one figure over the reference's
    seeds; `diverged` when any seed diverged (then there is no mean)."""
    values = [f["value"] for f in figures if f["value"] is not None]
    if len(values) < len(figures):
        return {"mean": None, "sd": None, "n": len(figures), "diverged": any(f["diverged"] for f in figures)}
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "sd": sd, "n": len(values), "diverged": False}


def _within_noise(kind: str, f: dict | None, ref: dict | None, tol: Tolerance) -> dict:
    """The rule for one fresh figure against the reference's seeds: abs / rel difference from the
    reference mean, the allowed difference, which term set it, and whether it holds."""
    out = {"abs_diff": None, "rel_diff": None, "allowed": None, "rule": None, "within_tolerance": False}
    if f is None or ref is None:
        return out  # measured on one side only
    if f["value"] is None or ref["mean"] is None:
        # A diverged figure reproduces only if the reference diverged too.
        out["within_tolerance"] = f["value"] is None and ref["mean"] is None and f["diverged"] == ref["diverged"]
        return out
    mean = ref["mean"]
    floor, floor_rule = ((tol.ppl_rel * abs(mean), f"{tol.ppl_rel:g} relative") if kind == "ppl"
                         else (tol.acc_abs, "exact" if tol.acc_abs <= ACC_ABS_TOL else f"{tol.acc_abs:g}"))
    noise = None if ref["sd"] is None else tol.sd_multiple * ref["sd"]
    allowed, rule = (noise, f"{tol.sd_multiple:g} x seed SD") if noise is not None and noise > floor else (floor, floor_rule)
    abs_diff = abs(f["value"] - mean)
    out.update(abs_diff=abs_diff, rel_diff=abs_diff / abs(mean) if mean != 0 else (0.0 if abs_diff == 0 else None),
               allowed=allowed, rule=rule, within_tolerance=abs_diff <= allowed)
    return out


def _shown(fig: dict | None):
    if fig is None:
        return None
    return fig["value"] if fig["value"] is not None else ("diverged" if fig["diverged"] else None)


def compare_runs(fresh_dir, reference_dir, tolerance: Tolerance | None = None,
                 require_identical_masks: bool = False) -> dict:
    """The whole comparison as one JSON-able dict (what reproduction.json holds)."""
    tol = tolerance or Tolerance()
    fresh_dir, reference_dir = Path(fresh_dir), Path(reference_dir)
    for what, d in (("fresh", fresh_dir), ("reference", reference_dir)):
        if not d.is_dir():
            raise UserError(f"{what} run directory {d} does not exist")
    fresh_recs, fresh_skipped = load_records(fresh_dir)
    ref_recs, ref_skipped = load_records(reference_dir)
    if not ref_recs:
        raise UserError(f"no records under {reference_dir / 'records'}: nothing to reproduce")
    fresh_groups, ref_groups = _group(fresh_recs), _group(ref_recs)
    fresh_keys = {r.get("key") for r in fresh_recs}
    ref_keys = {r.get("key") for r in ref_recs}

    rows, cells, failed = [], [], []
    missing_in_fresh, only_in_fresh, key_mismatches, mask_mismatches = [], [], [], []
    picked_fresh, picked_ref = [], []
    for cid in sorted(set(fresh_groups) | set(ref_groups)):
        model, method, sparsity = cid
        name = {"model": model, "method": method, "sparsity": sparsity}
        fr = {seed: _pick(recs, ref_keys) for seed, recs in sorted(fresh_groups.get(cid, {}).items())}
        rf = {seed: _pick(recs, fresh_keys) for seed, recs in sorted(ref_groups.get(cid, {}).items())}
        for side, picked in (("fresh", fr), ("reference", rf)):
            for rec in picked.values():
                if rec.get("status") != "ok":
                    failed.append({**name, "side": side, "seed": _seed(rec), "error": rec.get("error")})
        if not fr:
            missing_in_fresh.append(name)
            cells.append({**name, "status": "missing in fresh", "within_tolerance": False})
            continue
        if not rf:
            only_in_fresh.append(name)
            cells.append({**name, "status": "not in reference", "within_tolerance": None})
            continue
        ref_ok = [r for r in rf.values() if r.get("status") == "ok"]
        fresh_ok = {seed: r for seed, r in fr.items() if r.get("status") == "ok"}
        cell = {**name, "fresh_seeds": sorted(fr), "reference_seeds": sorted(rf),
                "fresh_status": "ok" if len(fresh_ok) == len(fr) else "failed",
                "reference_status": "ok" if ref_ok else "failed"}
        if len(fresh_ok) < len(fr) or not ref_ok:
            # Failed on the fresh side: not reproduced. Failed only in the reference: listed, but
            # the fresh run is not at fault.
            cell["status"] = "failed in fresh" if len(fresh_ok) < len(fr) else "failed in reference"
            cell["within_tolerance"] = False if len(fresh_ok) < len(fr) else None
            cells.append(cell)
            continue
        picked_fresh += fresh_ok.values()
        picked_ref += ref_ok
        ref_figures = [_figures(r) for r in ref_ok]
        metrics = sorted({m for figs in ref_figures for m in figs} | {m for r in fresh_ok.values() for m in _figures(r)},
                         key=lambda m: (not m.startswith("ppl:"), m))
        spread = {m: (_reference_spread([figs[m] for figs in ref_figures]) if all(m in figs for figs in ref_figures)
                      else None) for m in metrics}
        cell_ok, masks_cell, keys_cell = True, [], []
        for seed, rec in fresh_ok.items():
            same_seed = rf.get(seed) if (rf.get(seed) or {}).get("status") == "ok" else None
            masks = _masks_identical(rec, same_seed) if same_seed else UNKNOWN
            keys_match = same_seed is not None and rec.get("key") == same_seed.get("key")
            masks_cell.append(masks)
            keys_cell.append(keys_match)
            if same_seed is not None and not keys_match:
                key_mismatches.append({**name, "seed": seed, "fresh_key": rec.get("key"),
                                       "reference_key": same_seed.get("key")})
            ff = _figures(rec)
            for metric in metrics:
                f, ref = ff.get(metric), spread[metric]
                kind = (f or {"kind": "ppl" if metric.startswith("ppl:") else "acc"})["kind"]
                check = _within_noise(kind, f, ref, tol)
                cell_ok = cell_ok and check["within_tolerance"]
                rows.append({**name, "seed": seed, "metric": metric, "fresh": _shown(f),
                             "reference": None if ref is None else (ref["mean"] if ref["mean"] is not None else
                                                                    ("diverged" if ref["diverged"] else None)),
                             "reference_sd": None if ref is None else ref["sd"],
                             "reference_seeds": None if ref is None else ref["n"],
                             **check, "masks_identical": masks, "keys_match": keys_match})
        if any(m is False for m in masks_cell):
            mask_mismatches.append(name)
        if require_identical_masks and not all(m is True for m in masks_cell):
            cell_ok = False
        cell.update(keys_match=all(keys_cell), status="reproduced" if cell_ok else "differs", within_tolerance=cell_ok,
                    masks=("identical" if all(m is True for m in masks_cell) else UNKNOWN
                           if all(m == UNKNOWN for m in masks_cell) else
                           ("within seed noise" if cell_ok else "differ")))
        cells.append(cell)

    verdicts = _verdicts(picked_fresh, picked_ref)
    environment = _environment_differences(fresh_recs, ref_recs)
    differing = [c for c in cells if c.get("status") == "differs"]
    failed_fresh = [c for c in cells if c.get("status") == "failed in fresh"]
    changed = [v for v in verdicts if v["kept"] is False]
    # A record that cannot be read is a cell nobody can vouch for, on either side.
    unreadable = fresh_skipped or ref_skipped
    exit_status = 1 if (differing or missing_in_fresh or failed_fresh or changed or unreadable) else 0
    return {
        "fresh": str(fresh_dir), "reference": str(reference_dir),
        "tolerance": {**asdict(tol), "require_identical_masks": require_identical_masks,
                      "rule": f"|fresh - reference mean| <= max({tol.sd_multiple:g} x reference seed SD, floor); "
                              f"floor: perplexity {tol.ppl_rel:g} x reference mean, accuracy "
                              f"{'exact' if tol.acc_abs <= ACC_ABS_TOL else tol.acc_abs}",
                      "why": "the seed spread covers what the calibration draw and another CPU's rounding move; "
                             "the floor covers cells without a spread (seed-invariant or one seed)"},
        "reproduced": exit_status == 0, "exit_status": exit_status,
        "summary": {"cells": len(cells), "reproduced": sum(c.get("status") == "reproduced" for c in cells),
                    "differs": len(differing), "missing_in_fresh": len(missing_in_fresh),
                    "only_in_fresh": len(only_in_fresh), "failed": len(failed),
                    "key_mismatches": len(key_mismatches), "mask_mismatches": len(mask_mismatches),
                    "verdicts": len(verdicts), "verdicts_changed": len(changed)},
        "environment_differences": environment,
        "rows": rows, "cells": cells, "verdicts": verdicts, "missing_in_fresh": missing_in_fresh,
        "only_in_fresh": only_in_fresh, "failed": failed, "key_mismatches": key_mismatches,
        "mask_mismatches": mask_mismatches,
        "skipped_files": [{"side": side, "path": str(p), "reason": why}
                          for side, skipped in (("fresh", fresh_skipped), ("reference", ref_skipped))
                          for p, why in skipped],
    }


def _verdicts(fresh_recs: list[dict], ref_recs: list[dict]) -> list[dict]:
    """Every method pair the reference and the fresh run both hold (tables/comparisons.py's
    comparisons, dense included), with both verdicts and whether the fresh one keeps the
    reference's: its order where the reference is significant, and its significance where the
    fresh run has the seeds to judge it."""
    if not fresh_recs or not ref_recs:
        return []
    key = ["model", "sparsity", "method", "baseline", "baseline_sparsity", "metric"]
    ref = comparisons_frame(records_frame(ref_recs))
    fresh = comparisons_frame(records_frame(fresh_recs))
    if ref.empty or fresh.empty:
        return []
    merged = ref.merge(fresh, on=key, suffixes=("_ref", "_fresh"))
    out = []
    for _, m in merged.iterrows():
        if _nan(m["lo_ref"]) or _nan(m["diff_fresh"]):
            continue
        ref_sig = bool(m["significant_ref"])
        judged = not _nan(m["lo_fresh"]) and m["noise_fresh"] != EVAL_ONLY
        fresh_sig = None if _nan(m["lo_fresh"]) else bool(m["significant_fresh"])
        same_order = (m["diff_ref"] > 0) == (m["diff_fresh"] > 0)
        if ref_sig and not same_order:
            kept, why = False, "order reversed"
        elif judged and fresh_sig != ref_sig:
            kept, why = False, "significant in one run only"
        else:
            kept, why = True, ("order kept" if ref_sig else "not significant in the reference") + (
                "" if judged else "; significance not judged (fresh: evaluation noise only)")
        out.append({**{k: m[k] for k in key}, "reference_diff": float(m["diff_ref"]), "reference_lo": float(m["lo_ref"]),
                    "reference_hi": float(m["hi_ref"]), "reference_significant": ref_sig,
                    "reference_seeds": f"{_int(m['n_seeds_ref'])} vs {_int(m['baseline_n_seeds_ref'])}",
                    "fresh_diff": float(m["diff_fresh"]), "fresh_lo": None if _nan(m["lo_fresh"]) else float(m["lo_fresh"]),
                    "fresh_hi": None if _nan(m["hi_fresh"]) else float(m["hi_fresh"]), "fresh_significant": fresh_sig,
                    "fresh_seeds": f"{_int(m['n_seeds_fresh'])} vs {_int(m['baseline_n_seeds_fresh'])}",
                    "kept": kept, "why": why})
    return out


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("<NA>", "nan")


def _int(value):
    return None if _nan(value) else int(value)


# What can move float32 results between machines without any code change (a different CPU takes
# other SIMD kernels, so sums round differently and near-tie mask choices can flip).
ENV_FIELDS = ("cpu", "cpu_capability", "cpu_threads", "platform", "torch", "transformers", "device", "gpu")


def _environment_differences(fresh_recs: list, ref_recs: list) -> list:
    """[(field, fresh values, reference values)] for the ENV_FIELDS the two runs do not share."""
    def values(recs, field):
        return sorted({str((r.get("env") or {}).get(field)) for r in recs if r.get("status") == "ok"})

    out = []
    for field in ENV_FIELDS:
        fresh, ref = values(fresh_recs, field), values(ref_recs, field)
        if fresh != ref:
            out.append((field, fresh, ref))
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _fmt_rel(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def _label(c: dict) -> str:
    return f"{c['model']} | {c['method']} | {c['sparsity']}"


def _fmt_ref(r: dict) -> str:
    """"52.41 ± 0.83 (3)": the reference mean, its seed SD and seed count."""
    text = _fmt(r["reference"])
    if r.get("reference_sd") is not None:
        text += f" ± {r['reference_sd']:.3g}"
    return text + (f" ({r['reference_seeds']})" if r.get("reference_seeds") else "")


def _fmt_interval(lo, hi) -> str:
    return "-" if lo is None else f"[{lo:+.3g}, {hi:+.3g}]"


def render_markdown(result: dict) -> str:
    tol = result["tolerance"]
    s = result["summary"]
    verdict = "REPRODUCED" if result["reproduced"] else "NOT REPRODUCED"
    lines = [f"# Reproduction: {result['fresh']} vs {result['reference']}", "",
             f"**{verdict}**: {s['reproduced']} of {s['cells'] - s['only_in_fresh']} reference cells within the "
             f"reference's noise, {s['differs']} differ, {s['missing_in_fresh']} missing in the fresh run, "
             f"{s['failed']} failed record(s); {s['verdicts'] - s['verdicts_changed']} of {s['verdicts']} verdicts "
             f"between methods kept.", "",
             f"Rule: {tol['rule']}. Masks compared by sha256 with the reference's same seed"
             f"{' and required identical' if tol['require_identical_masks'] else ''}.",
             "", "| Model | Method | Sparsity | Seed | Metric | Fresh | Reference mean ± SD (seeds) | Diff | Allowed | "
                 "Masks identical | Within noise |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        flag = "yes" if r["within_tolerance"] else "**NO**"
        masks = r["masks_identical"] if r["masks_identical"] == UNKNOWN else _fmt(r["masks_identical"])
        allowed = "-" if r["allowed"] is None else f"{_fmt(r['allowed'])} ({r['rule']})"
        lines.append(f"| {r['model']} | {r['method']} | {r['sparsity']} | {r['seed']} | {r['metric']} | "
                     f"{_fmt(r['fresh'])} | {_fmt_ref(r)} | {_fmt(r['abs_diff'])} | {allowed} | {masks} | {flag} |")
    if result.get("verdicts"):
        lines += ["", "## Verdicts between methods (method minus baseline, 95% two-level bootstrap)", "",
                  "| Model | Sparsity | Method | Baseline | Metric | Reference [interval] (seeds) | "
                  "Fresh [interval] (seeds) | Kept |", "|---|---|---|---|---|---|---|---|"]
        for v in result["verdicts"]:
            flag = "yes" if v["kept"] else "**NO**"
            ref = f"{v['reference_diff']:+.3g} {_fmt_interval(v['reference_lo'], v['reference_hi'])} ({v['reference_seeds']})"
            fresh = f"{v['fresh_diff']:+.3g} {_fmt_interval(v['fresh_lo'], v['fresh_hi'])} ({v['fresh_seeds']})"
            lines.append(f"| {v['model']} | {v['sparsity']} | {v['method']} | {v['baseline']} | {v['metric']} | "
                         f"{ref} | {fresh} | {flag}: {v['why']} |")
    sections = [
        ("Missing in the fresh run", [_label(c) for c in result["missing_in_fresh"]]),
        ("Failed cells", [f"{_label(c)} seed {c['seed']} ({c['side']}): {c['error']}" for c in result["failed"]]),
        ("Keys differ (computed with different settings; figures still compared)",
         [f"{_label(c)} seed {c['seed']}: fresh {str(c['fresh_key'])[:12]}, reference {str(c['reference_key'])[:12]}"
          for c in result["key_mismatches"]]),
        ("Masks differ from the reference's same seed", [
            f"{_label(c)}: {next((x['masks'] for x in result['cells'] if _label(x) == _label(c)), '')}"
            for c in result["mask_mismatches"]]),
        ("Environment differs (float32 kernels differ across CPUs: sums round differently and near-tie "
         "mask choices of calibrated methods can flip, with no code change)",
         [f"{field}: fresh {', '.join(f)}; reference {', '.join(r)}"
          for field, f, r in result.get("environment_differences", [])]),
        ("Only in the fresh run (not compared)", [_label(c) for c in result["only_in_fresh"]]),
        ("Unreadable or invalid record files (skipped)", [f"{k['side']}: {k['path']}: {k['reason']}"
                                                          for k in result["skipped_files"]]),
    ]
    for title, items in sections:
        if items:
            lines += ["", f"## {title}", ""] + [f"- {i}" for i in items]
    return "\n".join(lines) + "\n"


def write_reproduction(result: dict, report_dir) -> tuple[Path, Path]:
    report_dir = Path(report_dir)
    return (atomic_write_json(report_dir / JSON_NAME, result),
            atomic_write_text(report_dir / MD_NAME, render_markdown(result)))


def reproduce(fresh_dir, reference_dir, *, tolerance: Tolerance | None = None, write_reference_report: bool = False,
              require_identical_masks: bool = False, out=None) -> int:
    """Compare, print the markdown table, write the reports; the exit status (0: reproduced)."""
    import sys

    result = compare_runs(fresh_dir, reference_dir, tolerance, require_identical_masks)
    text = render_markdown(result)
    (out or sys.stdout).write(text)
    write_reproduction(result, Path(fresh_dir) / REPORT_DIR)
    if write_reference_report:
        write_reproduction(result, Path(reference_dir) / REPORT_DIR)
    return result["exit_status"]


def load_reproduction(report_dir) -> dict | None:
    """reproduction.json from a report dir, or None (for the report page)."""
    path = Path(report_dir) / JSON_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
