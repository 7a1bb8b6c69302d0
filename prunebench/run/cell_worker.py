"""One cell in a process of its own: `python -m prunebench.run.cell_worker SPEC.json`.

`prunebench run --timeout M` starts one of these per cell (prunebench.run.executors.run_cell_in_worker)
so a cell that never returns can be stopped; `--nproc-per-node N` starts N of them per learned
cell through torchrun (`python -m prunebench.run.cell_worker --torchrun TORCHRUN-ARGS...`, which runs
torchrun inside this module so that it, too, dies with the runner).  Each runs the cell by key;
rank 0 writes the record as any runner does and, beside it, the outcome the launching runner counts.

`prunebench run --executor slurm` starts one per SLURM array task: `python -m prunebench.run.cell_worker
--slurm ARRAY.json SHA256` runs the cell whose key is at $SLURM_ARRAY_TASK_ID in the file, once the
file's sha256 is the one the batch script names (a file changed since submission is refused).
A spec is read as strict JSON; nothing is unpickled.

A worker never outlives the runner that started it, even one killed with SIGKILL: on Linux it
asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), then checks that the parent
the runner named is still its parent (it may have died before the request took effect, while
this module and the runner it runs cells with were being imported).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from prunebench import registry
from prunebench.run.executors import PARENT_PID_ENV
from prunebench.run.grid import grid_from_dict
from prunebench.run.runner import run_cell_by_key
from prunebench.errors import UserError
from prunebench.store.records import atomic_write_json, strict_json_hooks

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """SIGKILL this process when its parent dies (Linux); exit now if the parent named in
    PRUNEBENCH_PARENT_PID is already gone.  False where it cannot be arranged (not Linux, or
    started by hand without the variable)."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not sys.platform.startswith("linux") or not expected or not expected.isdigit():
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    # The parent may have died between our start and the prctl: we were re-parented then, and
    # no signal will come.
    if os.getppid() != int(expected):
        os._exit(1)
    return True


def _run_torchrun(args: list) -> int:
    """torchrun in this process; its workers (started by it, in sessions of their own) are told
    that it is the parent they die with."""
    from torch.distributed.run import main as torchrun

    os.environ[PARENT_PID_ENV] = str(os.getpid())
    try:
        torchrun(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:  # a worker failed: torchrun has printed which and why
        return 1
    return 0


def _configure_logging() -> None:
    """As the CLI has it: prunebench's messages at INFO, libraries' at WARNING (some at ERROR)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("prunebench").setLevel(logging.INFO)
    for noisy in ("transformers", "lm-eval", "lm_eval", "datasets", "urllib3", "filelock", "httpx", "torchao"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _read_spec(path: str, sha256: str | None = None) -> dict:
    """A cell spec: strict JSON, an object, and (for a SLURM task) the bytes submitted."""
    import hashlib

    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} changed since it was submitted (its sha256 is not the batch script's)")
    spec = json.loads(data.decode("utf-8"), **strict_json_hooks(ValueError))
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not isinstance(spec.get("options"), dict):
        raise ValueError(f"{path} is not a prunebench cell spec")
    return spec


def _slurm_cell(spec: dict) -> tuple:
    """(key, outcome path) of this array task, and the torch.distributed world of a job with
    several tasks (one per GPU, one node), described as torchrun would."""
    index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    keys = spec.get("keys")
    if not isinstance(keys, list) or not 0 <= index < len(keys) or not isinstance(keys[index], str):
        raise ValueError(f"array task {index} has no cell in the spec")
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks > 1:
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
                          WORLD_SIZE=str(ntasks), LOCAL_WORLD_SIZE=str(ntasks), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(20000 + job % 20000))
    return keys[index], Path(spec["outcomes"]) / f"{index}.outcome.json"


def main(argv=None) -> int:
    die_with_parent()  # first: everything after may take minutes
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    if argv[:1] == ["--torchrun"]:
        return _run_torchrun(argv[1:])
    slurm = argv[:1] == ["--slurm"]
    if len(argv) != (3 if slurm else 1):
        print("usage: python -m prunebench.run.cell_worker SPEC.json | --slurm ARRAY.json SHA256", file=sys.stderr)
        return 2

    try:
        spec = _read_spec(argv[1], argv[2]) if slurm else _read_spec(argv[0])
        if slurm:
            spec["key"], spec["outcome"] = _slurm_cell(spec)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        print(f"prunebench: error: {str(exc)[:300]}", file=sys.stderr)
        return 2
    registry.allow_replacing(spec.get("replace") or ())
    try:
        grid = grid_from_dict(spec["grid"], where="cell worker")
        outcome = run_cell_by_key(grid, spec["results_dir"], spec["key"], **spec["options"])
    except UserError as exc:  # one line for the runner to print (a full disk, ...), not a traceback
        outcome = {"key": spec["key"], "status": "failed", "error": str(exc), "user_error": True}
        try:
            if os.environ.get("RANK", "0") == "0":  # the outcome is rank 0's to write
                atomic_write_json(Path(spec["outcome"]), outcome)
        except OSError:
            print(f"prunebench: error: {exc}", file=sys.stderr)
        return 2
    if outcome["status"] != "follower":
        atomic_write_json(Path(spec["outcome"]), outcome)
    return 0 if outcome["status"] in ("ok", "skipped", "busy", "follower") else 1


if __name__ == "__main__":
    sys.exit(main())
