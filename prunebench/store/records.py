"""The record: one JSON file per grid cell, written atomically; and loading them all.

A record is never half-written: it is written to a temporary file in the same directory,
flushed to disk, then renamed over its final name (rename is atomic on POSIX).

Every record is checked when it is read (`read_record`), against `RECORD_SCHEMA` below:
- strict JSON: NaN / Infinity / -Infinity and duplicate names in an object are refused (prunebench
  never writes them, see `atomic_write_json`);
- `schema_version` is an integer from 1 to `SCHEMA_VERSION`; a newer one is refused with a reason
  saying a newer prunebench wrote it (this code cannot know what changed);
- the fields every reader relies on are present (`key`, `status`, `model.id`, `method.name`,
  `sparsity.label`, and `eval` in an ok record) and every known field, wherever present, has its
  type; fields this code does not know are allowed anywhere (a newer prunebench of the same
  schema version may add optional ones).
A file that fails is skipped by every reader with a one-line reason (`load_records` returns it):
never tabled, never counted as done, never fatal.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from prunebench.store.atomic import atomic_path

SCHEMA_VERSION = 1
RECORDS_DIR = "records"
LM_EVAL_SUFFIX = ".lm_eval.json"
REJECTED_DIR = "rejected"  # invalid records the runner moved aside before recomputing their cell

log = logging.getLogger("prunebench")


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


def attempt_records(results_dir, skipped: list | None = None) -> list[dict]:
    """The valid records under records/attempts/; (path, reason) of each invalid one goes to `skipped`."""
    folder = Path(results_dir) / RECORDS_DIR / ATTEMPTS_DIR
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = read_record(p)
        except (OSError, ValueError) as exc:
            if skipped is not None:
                skipped.append((p, _reason(exc)))
            continue
        rec["_path"] = str(p)
        out.append(rec)
    return out


def record_files(results_dir) -> list[Path]:
    folder = Path(results_dir) / RECORDS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.endswith(LM_EVAL_SUFFIX) and not p.name.startswith("."))


# ----------------------------------------------------------------------------- the schema

class InvalidRecord(ValueError):
    """A record file that is not strict JSON or does not match RECORD_SCHEMA; str() is the reason."""


@dataclass(frozen=True)
class Field:
    """What one JSON value may be.  `types` are JSON type names ("integer" is also a "number"; a
    bool is neither).  `fields`: an object's known members (others are allowed); `each`: what every
    member of an object with free names (datasets, tasks, layers) or every item of an array is."""
    types: tuple[str, ...]
    required: bool = False  # in every record
    required_if_ok: bool = False  # in every ok record
    fields: dict = field(default_factory=dict)
    each: Field | None = None
    choices: tuple = ()
    pattern: str | None = None  # a string must match it whole


def _f(*types, **kw) -> Field:
    return Field(tuple(types), **kw)


_NUM, _INT, _STR, _BOOL = _f("number", "null"), _f("integer", "null"), _f("string", "null"), _f("boolean", "null")
_NUMBERS = _f("array", "null", each=_NUM)

_DENSE_RELATIVE = _f("object", "null", fields={
    "kl_mean": _NUM, "kl_p99": _NUM, "top1": _NUM, "k": _INT, "kl": _STR, "p99": _STR, "dense_tail_mass": _NUM,
    "window_tokens": _INT, "window_kl": _NUMBERS, "window_top1": _f("array", "null", each=_f("integer")),
    "window_kl_hist": _f("array", "null", each=_f("array", each=_f("array", each=_f("integer")))),
    "by_definition": _BOOL, "summary": _f("object", "null", fields={
        "file": _STR, "computed_in_this_cell": _BOOL, "seconds": _NUM})})
_PERPLEXITY = _f("object", fields={
    "dense_relative": _DENSE_RELATIVE,
    "value": _NUM, "diverged": _BOOL, "seqlen": _INT, "n_windows": _INT, "n_tokens": _INT, "window_tokens": _INT,
    "window_nll": _NUMBERS, "windows_fingerprint": _STR, "stream_tokens": _INT, "scored": _STR,
    "text": _f("object", "null"), "sequence_start": _f("array", "null", each=_f("integer"))})
_ZEROSHOT = _f("object", fields={
    "metric": _STR, "value": _NUM, "stderr": _NUM, "n": _INT, "per_item": _STR, "source": _STR, "limit": _NUM, "chance": _NUM,
    "per_item_tasks": _f("array", "null", each=_f("array"))})

RECORD_SCHEMA = _f("object", fields={
    "schema_version": _f("integer", required=True),
    "key": _f("string", required=True, pattern=r"\S+"),
    "status": _f("string", required=True, choices=("ok", "failed")),
    "error": _STR,
    "traceback": _STR,
    "model": _f("object", required=True, fields={
        "id": _f("string", required=True, pattern=r".+"), "family": _STR, "dtype": _STR, "n_params": _INT,
        "n_prunable": _INT}),
    "method": _f("object", required=True, fields={
        "name": _f("string", required=True, pattern=r".+"), "config": _f("object", "null"),
        "stats": _f("object", "null", fields={"curves": _f("object", "null", fields={
            "heldout_step": _NUMBERS, "heldout_ppl": _NUMBERS})})}),
    "sparsity": _f("object", required=True, fields={
        "label": _f("string", required=True, pattern=r".+"), "target": _NUM, "pattern": _STR, "scope": _STR,
        "achieved": _NUM, "pruned_by_mask": _NUM, "per_layer": _f("object", "null", each=_NUM), "mask_sha256": _STR,
        "checked": _f("object", "null"),
        "allocation": _f("object", "null", fields={
            "block_targets": _NUMBERS, "block_achieved": _NUMBERS, "block_scores": _NUMBERS, "block_sizes": _NUMBERS,
            "block_labels": _f("array", "null")})}),
    "calibration": _f("object", "null", fields={"dataset": _STR, "n_samples": _INT, "seqlen": _INT, "seed": _INT,
                                                 "sequence_start": _f("array", "null", each=_f("integer"))}),
    "eval": _f("object", required_if_ok=True, fields={
        "perplexity": _f("object", "null", each=_PERPLEXITY),
        "zeroshot": _f("object", "null", each=_ZEROSHOT),
        "lm_eval_version": _STR}),
    # seconds: the model loaded (or its dense weights restored), the calibration windows read,
    # the method's prune (its calibration passes included), the output checks, the evaluation
    "timing": _f("object", "null", fields={"load_s": _NUM, "calibration_s": _NUM, "prune_s": _NUM,
                                           "checks_s": _NUM, "eval_s": _NUM}),
    "memory": _f("object", "null"),
    "warnings": _f("array", "null", each=_f("string")),
    "seed": _f("integer"),
    "seed_dependent": _f("boolean"),
    "spec": _f("object", "null", fields={"seed": _INT}),  # an older record's seed, when it has no "seed"
    "env": _f("object", "null"),
    "cost": _f("object", "null", fields={
        "value_dtype": _STR, "context": _INT, "linear_bytes": _NUM, "model_bytes": _NUM, "flops_per_token": _NUM,
        "linear_ratio": _NUM, "model_ratio": _NUM, "flops_ratio": _NUM, "formats": _f("object", "null", each=_NUM)}),
    "artifacts": _f("object", "null"),
    "created_at": _STR,
})


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_ok(value, types) -> bool:
    kind = _json_type(value)
    return kind in types or (kind == "integer" and "number" in types)


def _schema_errors(value, spec: Field, where: str, ok: bool) -> list[str]:
    """Every way `value` (at `where`) departs from `spec`, one short phrase each."""
    if not _type_ok(value, spec.types):
        return [f"{where} is {_json_type(value)}, expected {' or '.join(spec.types)}"]
    errors = []
    if spec.choices and value not in spec.choices:
        errors.append(f"{where} is {_short(value)}, expected one of {', '.join(map(repr, spec.choices))}")
    if spec.pattern is not None and isinstance(value, str) and not re.fullmatch(spec.pattern, value):
        errors.append(f"{where} is {_short(value)}: not a valid value")
    if isinstance(value, dict):
        for name, sub in spec.fields.items():
            if name in value:
                errors += _schema_errors(value[name], sub, f"{where}.{name}" if where else name, ok)
            elif sub.required or (ok and sub.required_if_ok):
                path = f"{where}.{name}" if where else name
                errors.append(f"missing {path}" + ("" if sub.required else " (an ok record)"))
        if spec.each is not None:
            errors += [e for k, v in value.items() for e in _schema_errors(v, spec.each, f"{where}.{k}", ok)]
    elif isinstance(value, list) and spec.each is not None:
        errors += [e for i, v in enumerate(value) for e in _schema_errors(v, spec.each, f"{where}[{i}]", ok)]
    return errors


def validate_record(rec) -> None:
    """Raise InvalidRecord with a one-line reason unless `rec` is a record this code can read."""
    if not isinstance(rec, dict):
        raise InvalidRecord(f"not a prunebench record: a JSON {_json_type(rec)}, not an object")
    version = rec.get("schema_version")
    if _json_type(version) == "integer" and version > SCHEMA_VERSION:
        # checked first: a newer layout may legitimately break the checks below
        raise InvalidRecord(f"written by a newer prunebench (schema_version {version}; this one reads up to "
                            f"{SCHEMA_VERSION}): upgrade prunebench to read it")
    if _json_type(version) == "integer" and version < 1:
        raise InvalidRecord(f"schema_version {version} is not a valid version (1 to {SCHEMA_VERSION})")
    errors = _schema_errors(rec, RECORD_SCHEMA, "", rec.get("status") == "ok")
    if errors:
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        raise InvalidRecord("; ".join(errors[:3]) + more)


def strict_json_hooks(error: type, constant_note: str = "") -> dict:
    """json.loads keyword arguments that refuse NaN / Infinity and a name twice in one object,
    raising `error` with a one-line reason (records here, checkpoint headers in state_files)."""
    def refuse_constant(name: str):
        raise error(f"not strict JSON: {name}{constant_note}")

    def no_duplicate_names(pairs: list) -> dict:
        out = {}
        for name, value in pairs:
            if name in out:
                raise error(f"not strict JSON: the name {name!r} twice in one object")
            out[name] = value
        return out

    return {"parse_constant": refuse_constant, "object_pairs_hook": no_duplicate_names}


# also what a record from before non-finite values were stored as null holds (a diverged
# perplexity as a bare Infinity, before 2026-12-01): refused like any other, its cell recomputed
_RECORD_JSON = strict_json_hooks(InvalidRecord, " (prunebench stores a non-finite number as null)")


def parse_record_text(text: str) -> dict:
    """Strict JSON -> a validated record (InvalidRecord / ValueError with a one-line reason)."""
    try:
        rec = json.loads(text, **_RECORD_JSON)
    except json.JSONDecodeError as exc:
        raise InvalidRecord(f"not valid JSON: {exc}") from None
    except RecursionError:  # hostile nesting must not stop a reader
        raise InvalidRecord("not a prunebench record: nested too deeply") from None
    validate_record(rec)
    return rec


def read_record(path: Path) -> dict:
    """A validated record; OSError if it cannot be read, InvalidRecord (a ValueError) if invalid."""
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as exc:
            raise InvalidRecord(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return parse_record_text(text)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def warn_skipped(skipped, action: str = "not read") -> None:
    """Name every record file a reader skipped, with its reason: one warning line each."""
    for path, reason in skipped:
        log.warning("invalid record %s: %s; %s", path, reason, action)


def reject_record(results_dir, path: Path, reason: str) -> Path:
    """Move an invalid record aside to <results>/rejected/ (never delete it) with its reason beside
    it in <name>.reason.txt; returns where it went.  The runner calls this before writing a
    recomputed record over an invalid one."""
    path = Path(path)
    folder = Path(results_dir) / REJECTED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{path.stem}.{stamp}{path.suffix}"
    n = 1
    while target.exists():  # two rejections of one file in the same microsecond: keep both
        target = folder / f"{path.stem}.{stamp}-{n}{path.suffix}"
        n += 1
    atomic_write_text(target.with_name(target.name + ".reason.txt"), f"{path}: {reason}\n")
    os.replace(path, target)  # same filesystem (both under results/): atomic, nothing copied
    return target


def load_records(results_dir) -> tuple[list[dict], list[tuple[Path, str]]]:
    """All valid records, and (path, one-line reason) for each file that was skipped: unreadable,
    not strict JSON or not matching the schema (see the module's docstring).  A skipped file's
    cell counts as not done (`ok_keys`, the runner) and is in no table."""
    records, skipped = [], []
    for path in record_files(results_dir):
        try:
            rec = read_record(path)
        except (OSError, ValueError) as exc:
            skipped.append((path, _reason(exc)))
            continue
        rec["_path"] = str(path)
        records.append(rec)
    # The last attempt of each cell: a failed --force rerun keeps the ok record, and says so.
    latest = {r["key"]: r for r in records}
    for attempt in attempt_records(results_dir, skipped):
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
    `n_windows_<ds>`, `windows_fp_<ds>`; the dense-relative metrics `kl_<ds>`, `kl_p99_<ds>`,
    `top1_<ds>` (NaN where not measured), `dense_k_<ds>` and their per-window values
    `window_kl_<ds>`, `window_top1_<ds>`, `window_kl_hist_<ds>`. Per zero-shot task: `acc_<task>`, `stderr_<task>`, `chance_<task>`,
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
            rel = v.get("dense_relative") or {}
            row[f"kl_{ds}"] = _finite(rel.get("kl_mean"))
            row[f"kl_p99_{ds}"] = _finite(rel.get("kl_p99"))
            row[f"top1_{ds}"] = _finite(rel.get("top1"))
            row[f"dense_k_{ds}"] = rel.get("k")
            row[f"window_kl_{ds}"] = rel.get("window_kl")
            row[f"window_top1_{ds}"] = rel.get("window_top1")
            row[f"window_kl_hist_{ds}"] = rel.get("window_kl_hist")
        for task, v in (ev.get("zeroshot") or {}).items():
            if isinstance(v, dict):
                row[f"acc_{task}"] = v.get("value")
                row[f"stderr_{task}"] = v.get("stderr")
                row[f"n_{task}"] = v.get("n")
                row[f"chance_{task}"] = v.get("chance")
                row[f"per_item_{task}"] = v.get("per_item")
                row[f"per_item_tasks_{task}"] = v.get("per_item_tasks")
        rows.append(row)
    return pd.DataFrame(rows)
