"""Every check that can be made before a model loads, in one place.

A grid that would fail hours into a run (a misspelt task, a window longer than the model's
positions, a device this machine lacks, a dataset missing from --data-dir) fails here instead,
as one UserError, with nothing written.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from prunebench.errors import UserError
from prunebench.modeling.models import resolve_dtype
from prunebench.run.grid import check_seeds
from prunebench.data.windows import _check_data_dir, check_dataset_name
from prunebench.modeling.models import check_model_spec, max_positions
from prunebench.evaluate.zeroshot import EMBEDDED_TASKS, prepare_local_task, resolve_tasks
from prunebench import registry
from prunebench.modeling import sequence_start as starts
from prunebench.modeling.sequence_start import check_prefix_fits
from prunebench.evaluate.zeroshot import PRESETS

log = logging.getLogger("prunebench")
_WARNED_REMOTE_CODE: set = set()  # the models already warned about in this process


def _positive(value, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}", hint="use 1 or more")


def _task_names(tasks) -> list:
    """The task names a grid's `tasks` list holds, presets ("paper", "embedded") spelt out."""
    names = []
    for t in tasks or []:
        names.extend(PRESETS.get(t, (t,)))
    return names


def check_device(device: str, *, require_available: bool = True) -> None:
    """A device name torch knows; with require_available (not in a dry run, which computes
    nothing) also one this machine has."""
    if not isinstance(device, str) or not device.strip():
        raise UserError(f"device must be a name such as cpu or cuda, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device type {dev.type!r} is not supported", hint="use cpu or cuda")
    if dev.type == "cpu" or not require_available:
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but this machine has no usable CUDA GPU",
                            hint="run with --device cpu, or on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) here",
                            hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"device {device!r} is not available on this machine", hint="use cpu")


def check_dtype(dtype) -> None:
    resolve_dtype(dtype)


def check_grid(grid, *, dry_run: bool = False) -> list:
    """Validate a whole grid up front; returns its cells (with their keys computed).

    dry_run: for listing the cells on any machine, offline: the device must be a valid name but
    need not be here, a hub model's config is read only from the local cache, and the keys are
    left to the caller (prunebench.run.dryrun computes those it can without the network)."""
    cal, ev = grid.calibration, grid.eval
    if grid.data_dir is not None:
        _check_data_dir(grid.data_dir)
    check_device(grid.device, require_available=not dry_run)
    check_dtype(grid.dtype)
    check_seeds(grid.seeds)
    for model in grid.models:
        check_model_spec(model)
    if len(set(grid.models)) != len(grid.models):
        raise UserError("a model is named twice in the grid", hint="name each model once")
    if grid.trust_remote_code is True:
        _warn_remote_code(grid.models)

    cells = grid.cells()  # method names, patterns and configs (types included)
    if not cells:
        raise UserError("the grid has no cells to run", hint="name methods with --methods")

    _positive(cal.n_samples, "calibration n_samples (--n-samples)")
    if isinstance(cal.seqlen, bool) or not isinstance(cal.seqlen, int) or cal.seqlen < 2:
        raise UserError(f"calibration seqlen must be an integer of at least 2, got {cal.seqlen!r}")
    if isinstance(ev.seqlen, bool) or not isinstance(ev.seqlen, int) or ev.seqlen < 2:
        raise UserError(f"evaluation seqlen must be an integer of at least 2, got {ev.seqlen!r}")
    _positive(ev.batch_size, "evaluation batch_size (--batch-size)")
    _positive(ev.zeroshot_batch_size, "eval zeroshot_batch_size")
    _positive(ev.max_ppl_windows, "eval max_ppl_windows", allow_none=True)
    limits = ev.limit if isinstance(ev.limit, dict) else {None: ev.limit}
    for task, limit in limits.items():
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0 \
                or (isinstance(limit, float) and limit > 1):
            what = "limit" if task is None else f"limit of {task}"
            raise UserError(f"{what} must be a positive number of documents (or a fraction in (0, 1]), got {limit!r}",
                            hint="e.g. --limit 200, or in a grid file limit: {mmlu: 5, piqa: 200}")
    if isinstance(ev.limit, dict):
        unknown = sorted(set(ev.limit) - set(_task_names(ev.tasks)))
        if unknown:
            raise UserError(f"limit names task(s) the grid does not evaluate: {', '.join(map(str, unknown))}",
                            hint=f"the grid's tasks: {', '.join(_task_names(ev.tasks)) or 'none'}")

    check_dataset_name(cal.dataset, "the calibration dataset")
    for ds in ev.perplexity:
        check_dataset_name(ds, "a perplexity dataset")
    if len(set(ev.perplexity)) != len(ev.perplexity):
        raise UserError("a perplexity dataset is named twice", hint="name each once")
    if not ev.perplexity and not ev.tasks:
        raise UserError("the grid evaluates nothing: no perplexity dataset and no zero-shot task",
                        hint="e.g. --ppl lee or --tasks embedded")
    if ev.tasks:
        for t in ev.tasks:
            if not isinstance(t, str):
                raise UserError(f"zero-shot task names must be strings, got {t!r}")

        names = resolve_tasks(ev.tasks, data_dir=grid.data_dir)  # lm-eval's index when a name is not ours
        if grid.data_dir is not None:
            for name in names:
                if name not in EMBEDDED_TASKS:
                    prepare_local_task(name, grid.data_dir)  # converts (cached) or says what is missing

    for model in grid.models:
        limit = max_positions(model, local_only=dry_run)
        for what, seqlen in (("calibration", cal.seqlen), ("evaluation", ev.seqlen)):
            if limit is not None and seqlen > limit:
                raise UserError(f"{what} seqlen {seqlen} exceeds {model}'s position limit of {limit} tokens",
                                hint=f"use --seqlen {limit} or less")
    _check_sequence_start(grid, cells)

    if not dry_run:
        for cell in cells:
            cell.key  # computes every fingerprint now: a missing dataset or unreadable file fails here
    return cells


def _check_sequence_start(grid, cells) -> None:
    """Every window a cell makes starts with its tokenizer's sequence start (prunebench.
    sequence_start): refuse, before any model loads, a window it would fill."""
    for model in grid.models:
        start = starts.model_sequence_start(model, grid.trust_remote_code) or []
        if not start:
            continue
        who = f"{model}'s tokenizer"
        check_prefix_fits(start, grid.calibration.seqlen, "calibration", who)
        if grid.eval.perplexity:
            check_prefix_fits(start, grid.eval.seqlen, "evaluation", who)
        for cell in cells:  # a learned method's own training windows
            seqlen = getattr(registry.create(cell.method, cell.method_config).config, "seqlen", None)
            if cell.model == model and isinstance(seqlen, int) and not isinstance(seqlen, bool):
                check_prefix_fits(start, seqlen, f"{cell.method} training", who)


def _warn_remote_code(models) -> None:
    """trust_remote_code runs Python shipped with the model: say so once (it is in every key)."""
    new = [m for m in models if m not in _WARNED_REMOTE_CODE]
    if new:
        _WARNED_REMOTE_CODE.update(new)
        log.warning("warning: trust_remote_code is true: loading %s runs Python code shipped with the model "
                    "(folder or hub repository) with your permissions; the records carry it in their keys",
                    ", ".join(new))


def check_results_dir(results_dir, *, create: bool) -> Path:
    """A results directory that can hold records: created if asked, probed for writing."""
    path = Path(results_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--results {str(results_dir)!r} is a file, not a directory", hint="give a directory")
    if not path.exists():
        if not create:
            raise UserError(f"results directory {str(results_dir)!r} does not exist", hint="run `prunebench run` first, or pass --results DIR")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"cannot create results directory {str(results_dir)!r}: {exc.strerror}",
                            hint="pick a writable place with --results") from None
    records = path / "records"
    if records.exists() and not records.is_dir():
        raise UserError(f"{records} is a file, not a directory", hint="move it away or pick another --results")
    if create:
        try:
            records.mkdir(exist_ok=True)
            probe = records / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"results directory {str(results_dir)!r} is not writable: {exc.strerror}",
                            hint="fix its permissions or pick another --results") from None
    return path
