"""The record: one JSON file per grid cell, written atomically; and loading them all.

A record is never half-written: it is written to a temporary file in the same directory,
flushed to disk, then renamed over its final name (rename is atomic on POSIX).  A file that
cannot be parsed is reported and skipped by every reader, never fatal.
"""
from __future__ import annotations

import json
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
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


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
    return records, skipped


def ok_keys(results_dir) -> set[str]:
    records, _ = load_records(results_dir)
    return {r["key"] for r in records if r.get("status") == "ok"}


def records_frame(records: list[dict]):
    """Flatten records into one row per cell, in the column convention of prunebench.report."""
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
        }
        ev = r.get("eval") or {}
        for ds, v in (ev.get("perplexity") or {}).items():
            row[f"ppl_{ds}"] = v.get("value")
            row[f"ppl_{ds}_seqlen"] = v.get("seqlen")
        for task, v in (ev.get("zeroshot") or {}).items():
            if isinstance(v, dict):
                row[f"acc_{task}"] = v.get("value")
                row[f"stderr_{task}"] = v.get("stderr")
        rows.append(row)
    return pd.DataFrame(rows)
