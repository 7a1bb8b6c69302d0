"""The record: one JSON file per grid cell, written atomically; and loading them all.

A record is never half-written: it is written to a temporary file in the same directory,
flushed to disk, then renamed over its final name (rename is atomic on POSIX).  A file that
cannot be parsed is reported and skipped by every reader, never fatal.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .atomic import atomic_path

SCHEMA_VERSION = 1
RECORDS_DIR = "records"
LM_EVAL_SUFFIX = ".lm_eval.json"


def atomic_write_text(path, text: str) -> Path:
    """Write, fsync, then rename into place: a reader sees the old file or the new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path, obj) -> Path:
    """Strict JSON: NaN and inf are refused here (sanitize_nonfinite first), so every reader,
    in any language, can parse what prunebench writes."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable, allow_nan=False) + "\n")


def sanitize_nonfinite(obj, path: str = "") -> list[str]:
    """Replace NaN/inf floats in a JSON-like structure by None, in place; returns their paths."""
    replaced = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        where = f"{path}.{k}" if path else str(k)
        if isinstance(v, float) and not math.isfinite(v):
            obj[k] = None
            replaced.append(where)
        elif hasattr(v, "item") and not isinstance(v, (dict, list)):  # numpy / torch scalars
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(f):
                obj[k] = None
                replaced.append(where)
        elif isinstance(v, (dict, list)):
            replaced.extend(sanitize_nonfinite(v, where))
    return replaced


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:60] or "x"


def cell_record_path(results_dir, model_id: str, method: str, sparsity_label: str, key: str) -> Path:
    """results/records/<model>__<method>__<sparsity>__<key12>.json: readable and unique."""
    name = "__".join([_slug(model_id), _slug(method), _slug(sparsity_label), key[:12]])
    return Path(results_dir) / RECORDS_DIR / f"{name}.json"


def record_path(results_dir, record: dict) -> Path:
    return cell_record_path(results_dir, record["model"]["id"], record["method"]["name"], record["sparsity"]["label"],
                            record["key"])


ATTEMPTS_DIR = "attempts"


def attempt_path(results_dir, record: dict) -> Path:
    """records/attempts/<cell>.<created_at>.<status>.json: an earlier or failed attempt, kept."""
    stem = record_path(results_dir, record).stem
    stamp = re.sub(r"[^0-9A-Za-z]+", "", str(record.get("created_at") or "unknown"))
    return Path(results_dir) / RECORDS_DIR / ATTEMPTS_DIR / f"{stem}.{stamp}.{_slug(record.get('status') or 'unknown')}.json"


def attempt_records(results_dir) -> list[dict]:
    folder = Path(results_dir) / RECORDS_DIR / ATTEMPTS_DIR
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = read_record(p)
        except (OSError, ValueError):
            continue
        rec["_path"] = str(p)
        out.append(rec)
    return out


def record_files(results_dir) -> list[Path]:
    folder = Path(results_dir) / RECORDS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.endswith(LM_EVAL_SUFFIX) and not p.name.startswith("."))


def read_record(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    if not isinstance(rec, dict) or "key" not in rec or "status" not in rec:
        raise ValueError("not a prunebench record (no key/status)")
    return rec


def load_records(results_dir) -> tuple[list[dict], list[tuple[Path, str]]]:
    """All parseable records, and (path, reason) for each file that was skipped."""
    records, skipped = [], []
    for path in record_files(results_dir):
        try:
            rec = read_record(path)
        except (OSError, ValueError) as exc:
            skipped.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        rec["_path"] = str(path)
        records.append(rec)
    # The last attempt of each cell: a failed --force rerun keeps the ok record, and says so.
    latest = {r["key"]: r for r in records}
    for attempt in attempt_records(results_dir):
        current = latest.get(attempt["key"])
        if current is None or str(attempt.get("created_at") or "") > str(current.get("created_at") or ""):
            latest[attempt["key"]] = attempt
    for rec in records:
        last = latest[rec["key"]]
        rec["_last_attempt"] = {"status": last.get("status"), "created_at": last.get("created_at"),
                                "error": last.get("error"), "path": last.get("_path")}
    return records, skipped


def ok_keys(results_dir) -> set[str]:
    records, _ = load_records(results_dir)
    return {r["key"] for r in records if r.get("status") == "ok"}


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def seed_dependent(record: dict) -> bool:
    """Whether the record's seed could change its figures: what the runner wrote, else (older
    records) whether its key holds a calibration draw."""
    if "seed_dependent" in record:
        return bool(record["seed_dependent"])
    return (record.get("spec") or {}).get("calibration") is not None


def records_frame(records: list[dict]):
    """Flatten records into one row per cell, in the column convention of prunebench.report.

    Per perplexity dataset: `ppl_<ds>` (NaN when diverged: never inf), `ppl_<ds>_seqlen`,
    `diverged_<ds>` (bool; also True for a pre-flag record holding inf / NaN), and what a paired
    comparison needs: `window_nll_<ds>` (list, None in records without it), `window_tokens_<ds>`,
    `n_windows_<ds>`, `windows_fp_<ds>`. Per zero-shot task: `acc_<task>`, `stderr_<task>`,
    `n_<task>`, `per_item_<task>` ('0'/'1' string or None), `per_item_tasks_<task>`.
    """
    import pandas as pd

    rows = []
    for r in records:
        sp = r.get("sparsity", {})
        row = {
            "key": r["key"], "status": r.get("status"), "error": r.get("error"),
            "model": r.get("model", {}).get("id"), "family": r.get("model", {}).get("family"),
            "method": r.get("method", {}).get("name"),
            "sparsity": sp.get("target"), "pattern": sp.get("pattern"), "sparsity_label": sp.get("label"),
            "scope": sp.get("scope"), "achieved_sparsity": sp.get("achieved"),
            "calibration": (r.get("calibration") or {}).get("dataset"),
            "prune_s": (r.get("timing") or {}).get("prune_s"), "eval_s": (r.get("timing") or {}).get("eval_s"),
            "n_warnings": len(r.get("warnings") or []), "created_at": r.get("created_at"),
            "mask_sha256": sp.get("mask_sha256"),
            "seed": r.get("seed", (r.get("spec") or {}).get("seed", 0)),
            "seed_dependent": seed_dependent(r),
            # A failed rerun keeps the ok record; these say how the latest attempt went.
            "last_attempt_status": (r.get("_last_attempt") or {}).get("status", r.get("status")),
            "last_attempt_at": (r.get("_last_attempt") or {}).get("created_at", r.get("created_at")),
            "last_attempt_error": (r.get("_last_attempt") or {}).get("error"),
        }
        ev = r.get("eval") or {}
        for ds, v in (ev.get("perplexity") or {}).items():
            value = v.get("value")
            row[f"ppl_{ds}"] = _finite(value)
            row[f"ppl_{ds}_seqlen"] = v.get("seqlen")
            row[f"diverged_{ds}"] = bool(v.get("diverged")) or (value is not None and _finite(value) is None)
            row[f"window_nll_{ds}"] = v.get("window_nll")
            row[f"window_tokens_{ds}"] = v.get("window_tokens")
            row[f"n_windows_{ds}"] = v.get("n_windows")
            row[f"windows_fp_{ds}"] = v.get("windows_fingerprint")
        for task, v in (ev.get("zeroshot") or {}).items():
            if isinstance(v, dict):
                row[f"acc_{task}"] = v.get("value")
                row[f"stderr_{task}"] = v.get("stderr")
                row[f"n_{task}"] = v.get("n")
                row[f"per_item_{task}"] = v.get("per_item")
                row[f"per_item_tasks_{task}"] = v.get("per_item_tasks")
        rows.append(row)
    return pd.DataFrame(rows)
