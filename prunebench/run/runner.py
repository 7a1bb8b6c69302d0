"""Grid -> cells -> records.

Cells are independent: each restores the dense weights, prunes, measures and evaluates, and
writes one record atomically.  Resume is keyed on the records alone: a cell whose key already
has an "ok" record is skipped.  A failing cell writes a "failed" record and the grid goes on.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import logging
import os
import platform
import resource
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunebench import registry
from prunebench.plugins import load_plugin
from prunebench.version import __version__
from prunebench.engines import distributed
from prunebench.engines.masklearn import mask_sparsity
from prunebench.run.executors import CellLock, CellRunner, LocalExecutor
from prunebench.run.grid import DENSE, CellSpec, GridSpec
from prunebench.data.windows import WindowSpec, calibration_windows, eval_tokens, text_fingerprint
from prunebench.provenance.environment_lock import lock_fingerprint
from prunebench.errors import UserError
from prunebench.evaluate.dense_relative import DEFAULT_K as DENSE_K, by_definition, load_summary, save_summary, summary_name
from prunebench.evaluate.perplexity import eval_windows, perplexity, perplexity_and_summary, scored_text, windows_fingerprint
from prunebench.modeling.models import (
    TINY_MODEL_SEED, all_prunable, load_model, restore_prunable, snapshot_prunable, weight_matrix
)
from prunebench.progress import progress_bar
from prunebench.modeling.sequence_start import sequence_start_ids
from prunebench.sparsity.checks import (
    SPARSITY_TOLERANCE, DenseReference, OutputCheckError, check_output, effective_scope
)
from prunebench.store.records import (
    SCHEMA_VERSION, atomic_write_json, attempt_path, cell_record_path, load_records, read_record,
    record_path, reject_record, sanitize_nonfinite, warn_skipped
)
from prunebench.contract import PruneContext, declares_weight_updates
from prunebench.sparsity.patterns import measure_sparsity, pack_mask
from prunebench.run.validate import check_grid, check_results_dir
from prunebench.store.artifacts import save_cell_masks
from prunebench.store.artifacts import MASKS_SUFFIX, WEIGHTS_SUFFIX, artifact_path
from prunebench.evaluate.zeroshot import evaluate_zeroshot, resolve_tasks
from prunebench.measure import cost

log = logging.getLogger("prunebench")

OFF_TARGET_PP = 0.5  # a cell whose achieved sparsity is further than this (in points) is flagged


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    busy: int = 0  # claimed by another live runner: left to it
    submitted: int = 0  # handed to a job array and not waited for
    job_ids: list = field(default_factory=list)
    records: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_grid(grid: GridSpec, results_dir, *, force: bool = False, progress: bool = True,
             only_keys: set | None = None, executor=None, save_masks: bool = False,
             lock_stale_s: float | None = None, plugins=()) -> RunSummary:
    """Run every cell without an ok record, through `executor` (default: in this process)."""
    results_dir = Path(results_dir)
    cells = check_grid(grid)  # everything checkable before a model loads; nothing written yet
    check_results_dir(results_dir, create=True)
    if only_keys is not None:
        cells = [c for c in cells if c.key in only_keys]
    existing, invalid = load_records(results_dir)
    warn_skipped(invalid, "not counted as done")  # its cell, if in this grid, runs again
    done = {r["key"] for r in existing if r.get("status") == "ok"}
    summary = RunSummary(total=len(cells))
    todo = [c for c in cells if force or c.key not in done]
    summary.skipped = len(cells) - len(todo)
    if summary.skipped:
        log.info("%d of %d cells already have ok records: skipped (--force redoes them)", summary.skipped, len(cells))
    executor = executor or LocalExecutor()
    runner = CellRunner(run_in_process=run_cells_in_process, record_stopped=record_stopped_cell)
    executor.run(grid, todo, results_dir, summary, runner, force=force, progress=progress, save_masks=save_masks,
                 lock_stale_s=lock_stale_s, plugins=plugins)
    return summary


def _claim_cell(cell: CellSpec, results_dir: Path, force: bool, lock_stale_s):
    """("run", claim) | ("busy", None) | ("skipped", None): claim the cell unless someone else has it
    or it was finished (by another runner) since the records were read."""
    claim = CellLock.claim(results_dir, cell.key, lock_stale_s)
    if claim is None:
        return "busy", None
    if not force and _has_ok_record(results_dir, cell):
        claim.release()
        return "skipped", None
    return "run", claim


def _release(claim) -> None:
    claim.release()


def _has_ok_record(results_dir: Path, cell: CellSpec) -> bool:
    path = cell_record_path(results_dir, cell.model, cell.method, cell.sparsity_label, cell.key)
    try:
        return read_record(path).get("status") == "ok"
    except (OSError, ValueError):
        return False


def run_cells_in_process(grid: GridSpec, cells: list, results_dir, summary: RunSummary, *, force=False,
                         progress=True, save_masks=False, lock_stale_s=None, plugins=()) -> None:
    """The local executor: cells grouped by model so each model loads once (lazily: a model all
    of whose cells are claimed elsewhere is never loaded)."""
    results_dir = Path(results_dir)
    bar = progress_bar(total=len(cells), desc="cells", enabled=progress, unit="cell", leave=True, position=0)
    by_model: dict[str, list[CellSpec]] = {}
    for cell in cells:
        by_model.setdefault(cell.model, []).append(cell)
    for model_id, model_cells in by_model.items():
        session = ModelSession(model_id, grid)
        for cell in model_cells:
            bar.set_description(f"cells [{cell.label}]")
            state, claim = _claim_cell(cell, results_dir, force, lock_stale_s)
            if state == "busy":
                summary.busy += 1
                log.info("cell claimed by another runner: %s", cell.label)
            elif state == "skipped":
                summary.skipped += 1
            else:
                try:
                    record = run_cell(cell, session, grid, results_dir, progress=progress, save_masks=save_masks)
                finally:
                    _release(claim)  # after the record is written (or on the way out of a crash)
                summary.records.append(record)
                if record["status"] == "ok":
                    summary.ok += 1
                else:
                    summary.failed += 1
                    log.error("cell failed: %s: %s", cell.label, record["error"])
            bar.update(1)
        session.close()
    bar.close()


def record_stopped_cell(grid: GridSpec, cell: CellSpec, results_dir, error: str, lock_stale_s) -> dict:
    """The failed record of a cell an executor stopped from outside (its worker past the timeout),
    written as any runner writes one (a previous ok record stays); the stopped worker's claim is
    stale now (its process is gone).  Returns the executor's outcome."""
    record = _record_skeleton(cell, grid)
    record.update(status="failed", error=error,
                  created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"))
    claim = CellLock.claim(results_dir, cell.key, lock_stale_s)
    if claim is None:  # another runner took the cell over meanwhile: its record, not ours
        return {"key": cell.key, "status": "failed", "error": error}
    try:
        write_cell_record(results_dir, record)
    except OSError as exc:
        raise unwritable(exc, results_dir, record) from None
    finally:
        claim.release()
    return {"key": cell.key, "status": "failed", "error": error, "record": record}


def run_cell_by_key(grid: GridSpec, results_dir, key: str, *, force: bool = False, progress: bool = False,
                    save_masks: bool = False, lock_stale_s: float | None = None, plugins=()) -> dict:
    """Run one cell of `grid` in this (fresh) process: what each array task does.

    Under torchrun or a multi-task SLURM job (prunebench.engines.distributed) every process calls this:
    rank 0 claims the cell, checks, evaluates and writes the record; the others join the
    training of a learned method and return {"status": "follower"}.

    Returns {"key", "status": ok | failed | skipped | busy | follower, "error", "record"}.
    """
    for plugin in plugins or ():
        load_plugin(plugin)
    matches = [c for c in grid.cells() if c.key == key]
    if not matches:
        raise UserError(f"no cell with key {key[:12]} in this grid", hint="the grid changed since it was submitted")
    cell, results_dir = matches[0], Path(results_dir)
    started = distributed.init_from_environment(grid.device)
    try:
        dp = distributed.DataParallel.current()
        state, claim = _claim_cell(cell, results_dir, force, lock_stale_s) if dp.is_main else (None, None)
        state = dp.broadcast(state)
        if state != "run":
            return {"key": key, "status": state, "error": None, "record": None}
        session = ModelSession(cell.model, grid)
        try:
            if not dp.is_main:  # only a learned method trains across processes; rank 0 does the rest
                if getattr(registry.get(cell.method), "kind", None) == "learned":
                    _prune_cell(cell, session, grid, results_dir, progress=False)
                return {"key": key, "status": "follower", "error": None, "record": None}
            record = run_cell(cell, session, grid, results_dir, progress=progress, save_masks=save_masks)
        finally:
            _release(claim)
            session.close()
        return {"key": key, "status": record["status"], "error": record.get("error"), "record": record}
    finally:
        if started:
            distributed.shutdown()


class ModelSession:
    """One loaded model shared by all cells of that model; dense weights restored per cell."""

    def __init__(self, model_id: str, grid: GridSpec):
        self.model_id, self.grid = model_id, grid
        self._loaded = None
        self._snapshot = None
        self.reference = None  # what the output checks compare each cell's pruned model with
        self._eval_tokens = {}
        self.dense = {}  # dense summaries by file name: read or computed once per session
        self.error = None

    def get(self):
        if self._loaded is None:
            self._loaded = load_model(self.model_id, dtype=self.grid.dtype, trust_remote_code=self.grid.trust_remote_code,
                                      seed=TINY_MODEL_SEED)
            self._snapshot = snapshot_prunable(self._loaded.model)
            # Digests of the other parameters; the dense linears are the restore snapshot itself.
            self.reference = DenseReference.take(self._loaded.model, self._snapshot)
        restore_prunable(self._loaded.model, self._snapshot)
        return self._loaded

    def reload(self):
        """Load the model afresh for the next cell: only the linears are restored between cells,
        and a failed cell may have changed more (a failed check of the other parameters says so)."""
        self._loaded = self._snapshot = self.reference = None

    def eval_ids(self, dataset: str):
        if dataset not in self._eval_tokens:
            self._eval_tokens[dataset] = eval_tokens(self._loaded.tokenizer, dataset, self.grid.data_dir,
                                                     encoding=self.grid.eval.encoding)
        return self._eval_tokens[dataset]

    def close(self):
        self._loaded = self._snapshot = self.reference = None
        self._eval_tokens.clear()
        self.dense.clear()


def run_cell(cell: CellSpec, session: ModelSession, grid: GridSpec, results_dir: Path, *, progress=True,
             save_masks: bool = False) -> dict:
    """Prune, check, evaluate and record one cell.  The record says ok only after the method's
    output passed every check in prunebench.sparsity.checks; anything else is a failed record with a
    one-line reason, and a previous ok record of the same cell is never replaced by a failure."""
    record = _record_skeleton(cell, grid)
    if grid.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    lm_eval_tmp = None
    try:
        dense = None if cell.method == DENSE else dense_summaries(cell, session, grid, results_dir, progress)
        loaded, report, prune_s = _prune_cell(cell, session, grid, results_dir, progress, record)
        model, tokenizer = loaded.model, loaded.tokenizer
        record["timing"]["prune_s"] = prune_s
        record["warnings"].extend(report.warnings)
        record["method"]["stats"] = _small({k: v for k, v in report.stats.items() if k != "allocation"})

        t_checks = time.perf_counter()
        named = [(name, weight_matrix(m)) for name, m in all_prunable(model).items()]
        scope = None if cell.method == DENSE else effective_scope(cell.sparsity, report.stats.get("scope"))
        if scope:
            record["sparsity"]["scope"] = scope  # the scope the method actually used (and was checked at)
        updates = declares_weight_updates(registry.get(cell.method).capabilities, report)
        found = check_output(named, cell.sparsity, scope, dense=cell.method == DENSE, layer_specs=report.layer_specs,
                             model=model, reference=session.reference, updates_weights=updates, masks=report.masks)
        if "allocation" in report.stats:  # per-block targets, scores and achieved values, plotted by the report
            record["sparsity"]["allocation"] = report.stats["allocation"]
        measured = measure_sparsity(named)
        record["sparsity"]["achieved"] = measured["overall"]
        record["sparsity"]["per_layer"] = measured["per_layer"]
        record["sparsity"]["mask_sha256"] = mask_fingerprint(named)
        # `achieved` counts the weights' zeros (what storage and the cost see), the dense model's own
        # zeros included; the method's mask says what it pruned (Gemma-3-270M's dequantised linears
        # hold 4.5% exact zeros, so the two differ there).  The target is judged on the mask.
        pruned = measured["overall"]
        if report.masks and cell.method != DENSE:
            pruned = mask_sparsity(report.masks)
            record["sparsity"]["pruned_by_mask"] = pruned
        record["sparsity"]["checked"] = {"finite": True, "pattern": cell.sparsity.pattern_name,
                                         "scope": scope, "tolerance": SPARSITY_TOLERANCE,
                                         "unchanged_parameters": found["unchanged_parameters"],
                                         "kept_weights": found["kept_weights"], "mask": found["mask"]}
        if found["weight_update"] is not None:  # how far a reconstruction moved the kept weights
            record["weight_update"] = found["weight_update"]
        record["cost"] = mask_cost(named, cell.sparsity if cell.method != DENSE else None, model)
        off = abs(pruned - cell.sparsity.target) * 100
        if off > OFF_TARGET_PP and cell.method != DENSE:
            record["warnings"].append(f"pruned fraction {pruned:.4f} is {off:.2f} points off the "
                                      f"target {cell.sparsity.target:.4f}")
        if save_masks and cell.method != DENSE:
            record["artifacts"] = save_cell_masks(model, results_dir, record, dense_snapshot=session._snapshot)

        t1 = time.perf_counter()
        record["timing"]["checks_s"] = round(t1 - t_checks, 3)  # output checks, measures, cost, saved masks
        lm_eval_tmp = _lm_eval_dir(results_dir, record).with_name(_lm_eval_dir(results_dir, record).name + f".tmp{os.getpid()}")
        record["eval"] = evaluate_cell(model, tokenizer, cell, session, grid, lm_eval_tmp, progress, dense, results_dir)
        record["timing"]["eval_s"] = round(time.perf_counter() - t1, 3)
        record["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except OutputCheckError as exc:  # the method ran, but its output is not what the cell asked for
        record["status"] = "failed"
        record["error"] = f"output check failed: {exc}"
        session.reload()
    except Exception as exc:  # a failing cell is recorded and the grid goes on
        session.reload()  # a method that failed half-way may have left anything changed
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:  # so would every later cell: stop, one line
            raise unwritable(exc, results_dir, record, lm_eval_tmp) from None
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        record["traceback"] = traceback.format_exc(limit=8)
    record["memory"] = _memory(grid.device)
    record["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
    replaced = sanitize_nonfinite(record)
    if replaced:
        record["warnings"].append(f"non-finite values stored as null: {', '.join(replaced[:10])}"
                                  + (f" and {len(replaced) - 10} more" if len(replaced) > 10 else ""))
    try:
        write_cell_record(results_dir, record, lm_eval_tmp)
    except OSError as exc:  # a full disk or an unwritable folder is the user's to fix, not a bug
        raise unwritable(exc, results_dir, record, lm_eval_tmp) from None
    return record


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def unwritable(exc: OSError, results_dir, record: dict, lm_eval_tmp: Path | None = None) -> UserError:
    """The one-line error for a cell whose output cannot be written; this attempt's masks and
    weights files go too (a masks file without its record is an orphan), unless the record
    already on disk names them."""
    try:
        kept = set((read_record(record_path(results_dir, record)).get("artifacts") or {}).values())
    except (OSError, ValueError, AttributeError):
        kept = set()
    for suffix in (MASKS_SUFFIX, WEIGHTS_SUFFIX):
        artifact = artifact_path(results_dir, record, suffix)
        artifact.with_name(f".{artifact.name}.tmp").unlink(missing_ok=True)
        if artifact.name not in kept:
            artifact.unlink(missing_ok=True)
    if lm_eval_tmp is not None:
        shutil.rmtree(lm_eval_tmp, ignore_errors=True)
    where = exc.filename or record_path(results_dir, record)
    return UserError(f"cannot write {where}: {exc.strerror or exc}",
                     hint="free some space (or fix the permissions) and rerun: finished cells keep their records")


def _prune_cell(cell: CellSpec, session: ModelSession, grid: GridSpec, results_dir, progress: bool,
                record: dict | None = None):
    """Load the model, build the method and its context, prune: (loaded, report, seconds).
    What every process of a multi-process cell runs; `record` (rank 0) gets the model and
    calibration details."""
    t_load = time.perf_counter()
    loaded = session.get()  # the first cell of a model loads it; later ones restore the dense weights
    model, tokenizer = loaded.model, loaded.tokenizer
    start = _sequence_start(cell, tokenizer)
    if record is not None:
        record["timing"]["load_s"] = round(time.perf_counter() - t_load, 3)
        record["model"].update({k: loaded.info.get(k) for k in ("family", "n_params", "n_prunable", "architecture",
                                                                 "revision", "file_sha256", "source")})
    pruner = registry.create(cell.method, cell.method_config)
    if cell.method != DENSE:
        pruner.check_spec(cell.sparsity)
    calibration = None
    if pruner.capabilities.needs_calibration:
        cs = cell.calibration
        t_calibration = time.perf_counter()
        calibration, fingerprint = calibration_windows(
            tokenizer, WindowSpec(cs.dataset, cs.n_samples, cs.seqlen, cell.seed, cs.encoding), grid.data_dir)
        if record is not None:
            record["timing"]["calibration_s"] = round(time.perf_counter() - t_calibration, 3)
            record["calibration"] = {**dataclasses.asdict(cs), "seed": cell.seed, "fingerprint": fingerprint,
                                     "sequence_start": start,
                                     "text": text_fingerprint(cs.dataset, "calibration", grid.data_dir, cs.encoding)}
    work_dir = Path(results_dir) / "work" / cell.key[:16]
    ctx = PruneContext(sparsity=cell.sparsity, calibration=calibration, device=grid.device, seed=cell.seed,
                       progress=progress, logger=log, registry=registry, tokenizer=tokenizer,
                       data_dir=grid.data_dir, calibration_dataset=cell.calibration.dataset, work_dir=work_dir,
                       eval_datasets=tuple(grid.eval.perplexity))
    torch.manual_seed(cell.seed)
    t0 = time.perf_counter()
    report = pruner.prune(model, ctx)
    return loaded, report, round(time.perf_counter() - t0, 3)


def _sequence_start(cell: CellSpec, tokenizer) -> list[int]:
    """The loaded tokenizer's sequence start, which every window gets: it must be the one the
    cell's key was made with (read from the model file before loading)."""
    start = sequence_start_ids(tokenizer)
    keyed = cell.identity()["eval"].get("sequence_start")
    if keyed is not None and list(keyed) != start:
        raise RuntimeError(f"the tokenizer starts sequences with {start}, but the cell's key was made for {keyed}")
    return start


def _lm_eval_dir(results_dir, record) -> Path:
    return Path(results_dir) / "records" / (record_path(results_dir, record).stem + ".lm_eval")


def write_cell_record(results_dir, record: dict, lm_eval_tmp: Path | None = None) -> Path:
    """Write a finished cell's record without ever losing a good one.

    ok: becomes the cell's record; the one it replaces (a previous ok of a --force rerun, or a
    failure) moves to records/attempts/.  failed: if the cell already has an ok record, that stays
    and the failure is kept beside it in records/attempts/ (the report shows the last attempt's
    status); otherwise it becomes the cell's record.
    """
    path = record_path(results_dir, record)
    previous = None
    try:
        previous = read_record(path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # an invalid record is evidence: moved aside, never overwritten
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        moved = reject_record(results_dir, path, reason)
        log.warning("invalid record %s (%s) moved to %s; its cell was recomputed", path, reason, moved)
    if record["status"] != "ok" and previous is not None and previous.get("status") == "ok":
        attempt = attempt_path(results_dir, record)
        atomic_write_json(attempt, record)
        if lm_eval_tmp is not None and lm_eval_tmp.exists():
            shutil.rmtree(lm_eval_tmp, ignore_errors=True)
        return attempt
    if previous is not None:
        atomic_write_json(attempt_path(results_dir, previous), previous)
    if lm_eval_tmp is not None and lm_eval_tmp.exists():
        final = _lm_eval_dir(results_dir, record)
        if final.exists():
            shutil.rmtree(final)
        os.replace(lm_eval_tmp, final)
    atomic_write_json(path, record)
    return path


def _summary_identity(cell, session, dataset: str) -> dict:
    """What a dense summary of one evaluation text depends on: its file is named by its hash."""
    ev, spec = cell.eval, cell.identity()
    windows = eval_windows(session.eval_ids(dataset), ev.seqlen, ev.max_ppl_windows, sequence_start_ids(session._loaded.tokenizer))
    vocab = session._loaded.model.get_output_embeddings().out_features
    return {"model_fingerprint": spec["model_fingerprint"], "dtype": spec["dtype"], "device": spec["device"],
            "windows_fingerprint": windows_fingerprint(windows), "shape": list(windows.shape),
            "sequence_start": spec["eval"]["sequence_start"], "k": DENSE_K, "vocab": vocab,
            "eval_code_sha256": spec["eval"]["code_sha256"]}


def dense_summaries(cell, session, grid, results_dir, progress) -> dict:
    """{dataset: (DenseSummary, how it was obtained)}: from this session's memory, else the file
    under results/work/dense/, else one dense forward over the windows (the model, restored to its
    dense weights, before the cell prunes it) written atomically for every later cell."""
    if session._loaded is None:
        session.get()
    out = {}
    for dataset in cell.eval.perplexity:
        identity = _summary_identity(cell, session, dataset)
        path = Path(results_dir) / "work" / "dense" / summary_name(identity)
        info = {"file": str(path.relative_to(results_dir)), "computed_in_this_cell": False, "seconds": None}
        if path.name in session.dense:
            out[dataset] = (session.dense[path.name], info)
            continue
        if path.exists():
            summary = load_summary(path, identity)
        else:
            ev, t0 = cell.eval, time.perf_counter()
            loaded = session.get()  # restores the dense weights (the last cell left its pruned ones)
            _, summary = perplexity_and_summary(loaded.model, session.eval_ids(dataset), ev.seqlen, k=DENSE_K,
                                                batch_size=ev.batch_size, device=grid.device, progress=progress,
                                                max_windows=ev.max_ppl_windows, prefix=sequence_start_ids(loaded.tokenizer))
            save_summary(path, summary, identity)
            info.update(computed_in_this_cell=True, seconds=round(time.perf_counter() - t0, 3))
        session.dense[path.name] = summary
        out[dataset] = (summary, info)
    return out


def evaluate_cell(model, tokenizer, cell, session, grid, lm_eval_dir, progress, dense=None, results_dir=None) -> dict:
    """Perplexity and, against the dense summary (`dense`: {dataset: (summary, info)}), the
    dense-relative metrics; the dense cell's own are 0 and 1 by definition."""
    out = {"perplexity": {}, "zeroshot": {}}
    ev = cell.eval
    start = sequence_start_ids(tokenizer)
    for dataset in ev.perplexity:
        ids = session.eval_ids(dataset)
        summary, info = (dense or {}).get(dataset, (None, None))
        result = perplexity(model, ids, ev.seqlen, batch_size=ev.batch_size, device=grid.device, progress=progress,
                            max_windows=ev.max_ppl_windows, prefix=start, dense=summary)
        if summary is not None:
            result["dense_relative"]["summary"] = info
        elif cell.method == DENSE:
            result["dense_relative"] = by_definition(result["n_windows"], result["window_tokens"], DENSE_K, None)
        # Which text, and which part of it, was scored.
        result["text"] = text_fingerprint(dataset, "eval", grid.data_dir, ev.encoding)
        result["stream_tokens"] = int(ids.numel())
        result["scored"] = scored_text(result["n_windows"], ev.seqlen, start, int(ids.numel()))
        out["perplexity"][dataset] = result
    if ev.tasks:
        tasks = resolve_tasks(ev.tasks, data_dir=grid.data_dir)
        results = evaluate_zeroshot(model, tokenizer, tasks, data_dir=grid.data_dir, limit=ev.limit,
                                    batch_size=ev.zeroshot_batch_size, device=grid.device, output_dir=lm_eval_dir,
                                    seed=cell.seed)
        out["lm_eval_version"] = results.pop("lm_eval_version", None)
        out["zeroshot"] = results
    return out


def mask_fingerprint(named_weights) -> str:
    """sha256 of which weights are zero, layer by layer in name order: equal iff the masks are."""
    h = hashlib.sha256()
    for name, w in sorted(named_weights, key=lambda nw: nw[0]):
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(pack_mask((w != 0).cpu()).numpy().tobytes())
    return h.hexdigest()


def _record_skeleton(cell: CellSpec, grid: GridSpec) -> dict:
    sp = cell.sparsity
    return {
        "schema_version": SCHEMA_VERSION,
        "key": cell.key,
        "status": "running",
        "error": None,
        "model": {"id": cell.model, "dtype": cell.dtype},
        "method": {"name": cell.method, "config": cell.method_config},
        "sparsity": {"target": sp.target, "pattern": sp.pattern_name, "scope": sp.scope,
                     "label": cell.sparsity_label, "achieved": None, "per_layer": {}},
        "calibration": None,
        "eval": {},
        "timing": {"load_s": None, "calibration_s": None, "prune_s": None, "checks_s": None, "eval_s": None},
        "memory": {},
        "warnings": [],
        "seed": cell.seed,
        # whether another seed could give other figures (the calibration draw, the method's noise)
        "seed_dependent": registry.get(cell.method).capabilities.seed_dependent,
        "spec": cell.identity(),
        "env": environment(grid.device),
    }


def _small(stats: dict) -> dict:
    """Keep JSON-friendly scalars and short lists from a PruneReport's stats."""
    out = {}
    for k, v in (stats or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and len(v) <= 10000:
            out[k] = [x if isinstance(x, (int, float, str, bool)) else str(x) for x in v]
        elif isinstance(v, dict) and len(v) <= 10000:
            out[k] = _small(v)
    return out


def _memory(device: str) -> dict:
    # ru_maxrss is the process high-water mark (KiB on Linux), not a per-cell figure.
    mem = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "peak_rss_scope": "process"}
    if device.startswith("cuda") and torch.cuda.is_available():
        mem["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        mem["peak_gpu_mb"] = None
    return mem


_ENV_CACHE: dict = {}


def environment(device: str) -> dict:
    if device in _ENV_CACHE:
        return _ENV_CACHE[device]
    import sys

    def version(mod):
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return None

    env = {"prunebench": __version__, "torch": torch.__version__, "transformers": version("transformers"),
           "lm_eval": version("lm_eval"), "python": sys.version.split()[0], "platform": platform.platform(),
           "device": device, "cpu_threads": torch.get_num_threads(), "cpu": _cpu_model(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "git_sha": _git_sha(),
           "lock": lock_fingerprint()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    _ENV_CACHE[device] = env
    return env


def mask_cost(named, spec, model) -> dict:
    """Storage (smallest valid format per linear, bf16 values) and FLOPs per token of the pruned
    weights, from their zeros (prunebench.measure.cost): arithmetic, not a speed measurement."""
    masks = {name: w.detach() != 0 for name, w in named}
    return cost.model_cost(cost.linears_for_spec(masks, spec), cost.model_shape(model))


# What decides a record's numbers: a change here, committed or not, is a change of the code.
CODE_PATHS = ("prunebench", "methods", "pyproject.toml", "constraints.txt")


def uncommitted_code() -> list:
    """Files under CODE_PATHS that differ from the checked-out commit (untracked ones included);
    empty where the code is a clean commit or there is no git checkout."""
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", *CODE_PATHS],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line[3:] for line in out.stdout.splitlines() if line.strip() and "__pycache__" not in line]


def _cpu_model() -> str:
    """The CPU's model name (float32 kernels, hence the last bits of results, depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha():
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None
