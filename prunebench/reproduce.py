"""`prunebench reproduce`: does a fresh run reproduce a reference run (the committed results/)?

Cells are matched by (model id, method, sparsity label). For each matched cell every perplexity
and zero-shot figure is compared within the tolerances below, and the masks by their sha256. A
differing key is flagged (the key hashes the cell's settings, so the two cells were not computed
with the same settings) but the figures are still compared.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .records import atomic_write_json, atomic_write_text, load_records

REPORT_DIR = "report"
JSON_NAME = "reproduction.json"
MD_NAME = "reproduction.md"
UNKNOWN = "unknown"

# Tolerances, in one place. The same cell run twice on one machine gives bit-identical figures,
# so a tolerance only has to absorb summation order: other machines' float32 CPU kernels (SIMD
# width, thread count), which can also flip a weight sitting exactly at a mask threshold, and
# changes in how the NLL is accumulated. Measured: magnitude 0.5 recomputed in a fresh venv from
# constraints.txt on a different VM, with per-window float64 NLL sums instead of the reference's
# float32 batch sums, gave 456.1232 vs 456.1265: 7.3e-6 relative, same accuracy. 1e-3 relative
# on perplexity is >100x that, yet 20x below the smallest gap between two methods in the
# committed table (LEAP 43.67 vs ADMM 44.54 at 50%, 2%), so what it lets through never changes a
# conclusion. Accuracy is a count of items over n: any difference is at least one item flipping,
# a real change, so it must be equal (the float tolerance only absorbs the division).
PPL_REL_TOL = 1e-3
ACC_ABS_TOL = 1e-9


@dataclass(frozen=True)
class Tolerance:
    ppl_rel: float = PPL_REL_TOL
    acc_abs: float = ACC_ABS_TOL


def _cell_id(rec: dict) -> tuple[str, str, str]:
    return (str((rec.get("model") or {}).get("id")), str((rec.get("method") or {}).get("name")),
            str((rec.get("sparsity") or {}).get("label")))


def _pick(records: list[dict], other_keys: set[str]) -> dict:
    """One record per cell: one whose key the other side also has, else ok before failed, newest."""
    return max(records, key=lambda r: (r.get("key") in other_keys, r.get("status") == "ok",
                                       str(r.get("created_at") or "")))


def _group(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(_cell_id(r), []).append(r)
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


def _compare_value(kind: str, f: dict | None, r: dict | None, tol: Tolerance):
    """(rel_diff, abs_diff, within_tolerance) for one figure."""
    if f is None or r is None:
        return None, None, False  # measured on one side only
    fv, rv = f["value"], r["value"]
    if fv is None or rv is None:
        # A diverged (or missing) figure reproduces only if the other side diverged too.
        same = fv is None and rv is None and f["diverged"] == r["diverged"]
        return None, None, same
    fv, rv = float(fv), float(rv)
    abs_diff = abs(fv - rv)
    rel = abs_diff / abs(rv) if rv != 0 else (0.0 if fv == 0 else None)
    if kind == "ppl":
        ok = rel is not None and rel <= tol.ppl_rel
    else:
        ok = abs_diff <= tol.acc_abs
    return rel, abs_diff, ok


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
    for cid in sorted(set(fresh_groups) | set(ref_groups)):
        model, method, sparsity = cid
        name = {"model": model, "method": method, "sparsity": sparsity}
        fr = _pick(fresh_groups[cid], ref_keys) if cid in fresh_groups else None
        rf = _pick(ref_groups[cid], fresh_keys) if cid in ref_groups else None
        for side, rec in (("fresh", fr), ("reference", rf)):
            if rec is not None and rec.get("status") != "ok":
                failed.append({**name, "side": side, "error": rec.get("error")})
        if fr is None:
            missing_in_fresh.append(name)
            cells.append({**name, "status": "missing in fresh", "within_tolerance": False})
            continue
        if rf is None:
            only_in_fresh.append(name)
            cells.append({**name, "status": "not in reference", "within_tolerance": None})
            continue
        keys_match = fr.get("key") == rf.get("key")
        if not keys_match:
            key_mismatches.append({**name, "fresh_key": fr.get("key"), "reference_key": rf.get("key")})
        masks = _masks_identical(fr, rf)
        if masks is False:
            mask_mismatches.append(name)
        cell = {**name, "fresh_key": fr.get("key"), "reference_key": rf.get("key"), "keys_match": keys_match,
                "fresh_status": fr.get("status"), "reference_status": rf.get("status"), "masks_identical": masks}
        if fr.get("status") != "ok" or rf.get("status") != "ok":
            # Failed on the fresh side: not reproduced. Failed only in the reference: listed, but
            # the fresh run is not at fault.
            cell["status"] = "failed in fresh" if fr.get("status") != "ok" else "failed in reference"
            cell["within_tolerance"] = False if fr.get("status") != "ok" else None
            cells.append(cell)
            continue
        ff, rr = _figures(fr), _figures(rf)
        cell_ok = True
        for metric in sorted(set(ff) | set(rr), key=lambda m: (not m.startswith("ppl:"), m)):
            f, r = ff.get(metric), rr.get(metric)
            kind = (f or r)["kind"]
            rel, abs_diff, ok = _compare_value(kind, f, r, tol)
            cell_ok = cell_ok and ok
            rows.append({**name, "metric": metric, "fresh": _shown(f), "reference": _shown(r),
                         "rel_diff": rel, "abs_diff": abs_diff, "masks_identical": masks,
                         "keys_match": keys_match, "within_tolerance": ok})
        if require_identical_masks and masks is not True:
            cell_ok = False
        cell["status"] = "reproduced" if cell_ok else "differs"
        cell["within_tolerance"] = cell_ok
        cells.append(cell)

    environment = _environment_differences(fresh_recs, ref_recs)
    differing = [c for c in cells if c.get("status") == "differs"]
    failed_fresh = [c for c in cells if c.get("status") == "failed in fresh"]
    exit_status = 1 if (differing or missing_in_fresh or failed_fresh) else 0
    return {
        "fresh": str(fresh_dir), "reference": str(reference_dir),
        "tolerance": {**asdict(tol), "require_identical_masks": require_identical_masks,
                      "why": "perplexity: relative, absorbs float32 kernel noise across machines; "
                             "accuracy: exact (one item flipping is a real change)"},
        "reproduced": exit_status == 0, "exit_status": exit_status,
        "summary": {"cells": len(cells), "reproduced": sum(c.get("status") == "reproduced" for c in cells),
                    "differs": len(differing), "missing_in_fresh": len(missing_in_fresh),
                    "only_in_fresh": len(only_in_fresh), "failed": len(failed),
                    "key_mismatches": len(key_mismatches), "mask_mismatches": len(mask_mismatches)},
        "environment_differences": environment,
        "rows": rows, "cells": cells, "missing_in_fresh": missing_in_fresh, "only_in_fresh": only_in_fresh,
        "failed": failed, "key_mismatches": key_mismatches, "mask_mismatches": mask_mismatches,
        "skipped_files": [{"side": side, "path": str(p), "reason": why}
                          for side, skipped in (("fresh", fresh_skipped), ("reference", ref_skipped))
                          for p, why in skipped],
    }


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


def render_markdown(result: dict) -> str:
    tol = result["tolerance"]
    s = result["summary"]
    verdict = "REPRODUCED" if result["reproduced"] else "NOT REPRODUCED"
    lines = [f"# Reproduction: {result['fresh']} vs {result['reference']}", "",
             f"**{verdict}**: {s['reproduced']} of {s['cells'] - s['only_in_fresh']} reference cells within tolerance, {s['differs']} differ, "
             f"{s['missing_in_fresh']} missing in the fresh run, {s['failed']} failed record(s).", "",
             f"Tolerance: perplexity relative {tol['ppl_rel']:g}, accuracy absolute {tol['acc_abs']:g} "
             f"(exact); masks compared by sha256{' and required identical' if tol['require_identical_masks'] else ''}.",
             "", "| Model | Method | Sparsity | Metric | Fresh | Reference | Rel. diff | Masks identical | Within tol. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        flag = "yes" if r["within_tolerance"] else "**NO**"
        masks = r["masks_identical"] if r["masks_identical"] == UNKNOWN else _fmt(r["masks_identical"])
        lines.append(f"| {r['model']} | {r['method']} | {r['sparsity']} | {r['metric']} | {_fmt(r['fresh'])} | "
                     f"{_fmt(r['reference'])} | {_fmt_rel(r['rel_diff'])} | {masks} | {flag} |")
    sections = [
        ("Missing in the fresh run", [_label(c) for c in result["missing_in_fresh"]]),
        ("Failed cells", [f"{_label(c)} ({c['side']}): {c['error']}" for c in result["failed"]]),
        ("Keys differ (computed with different settings; figures still compared)",
         [f"{_label(c)}: fresh {str(c['fresh_key'])[:12]}, reference {str(c['reference_key'])[:12]}"
          for c in result["key_mismatches"]]),
        ("Masks differ", [_label(c) for c in result["mask_mismatches"]]),
        ("Environment differs (float32 kernels differ across CPUs: sums round differently and near-tie "
         "mask choices of calibrated methods can flip, with no code change)",
         [f"{field}: fresh {', '.join(f)}; reference {', '.join(r)}"
          for field, f, r in result.get("environment_differences", [])]),
        ("Only in the fresh run (not compared)", [_label(c) for c in result["only_in_fresh"]]),
        ("Unreadable record files (skipped)", [f"{k['side']}: {k['path']}: {k['reason']}"
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
