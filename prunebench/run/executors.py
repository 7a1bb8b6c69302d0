"""Where cells run, and how concurrent runners share one results directory.

Executors:
  local   - in this process, one loaded model shared by that model's cells (the default); with a
            per-cell timeout (--timeout) each cell runs in a worker process of its own instead, and
            one that runs past it is stopped and recorded as failed;
  torchrun- local with --nproc-per-node N: each learned cell runs as N processes under torchrun
            (torch.distributed data parallelism, prunebench.engines.distributed); other cells as local;
Every process a runner starts (cell workers, torchrun and its workers) dies with it, even when
the runner is killed with SIGKILL (prunebench.run.cell_worker.die_with_parent, Linux).
  slurm   - one SLURM job array per grid (sbatch), one array task per cell, started from a JSON
            cell spec on a command line; each task loads its model, runs the cell by key and writes
            its record into the (shared) results directory; the runner waits on squeue / sacct and
            reads back only JSON (SlurmExecutor).

Cell claims: before computing a cell a runner creates results/records/.locks/<key>.lock with
O_CREAT|O_EXCL (atomic on POSIX and on NFSv3+), holding pid, host, time and the SLURM job id.
Another runner skips a claimed cell.  A claim is stale, and may be taken over, when its
process is gone (same host, pid dead; or the same SLURM array task requeued) or its file has not
been touched for `stale_after_s` (a live holder touches it every few seconds, so only dead
holders on other hosts age).  The claim is removed after the record is written.

An executor never imports the runner: run_grid hands it a CellRunner, the two things it needs
from the runner (run cells in this process; record a cell stopped from outside).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prunebench.errors import UserError
from prunebench import registry
from prunebench.store.records import (RECORDS_DIR, atomic_write_json, atomic_write_text, cell_record_path, read_record,
                                      strict_json_hooks)

log = logging.getLogger("prunebench")

LOCKS_DIR = ".locks"
DEFAULT_STALE_S = 600.0  # a claim whose file is this old (no heartbeat) is abandoned
EMPTY_LOCK_GRACE_S = 30.0  # a claim file with no content yet: its writer is between open and write
# The pid of the process that started a cell worker, set by it in the worker's environment: the
# parent whose death must end the worker (prunebench.run.cell_worker.die_with_parent).
PARENT_PID_ENV = "PRUNEBENCH_PARENT_PID"


def _job_id() -> str | None:
    """This process's SLURM array task (kept across requeues), or None outside SLURM."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if task else job


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def locks_dir(results_dir) -> Path:
    return Path(results_dir) / RECORDS_DIR / LOCKS_DIR


class CellLock:
    """A claim on one cell; `claim` returns None when a live runner holds it."""

    def __init__(self, path: Path, token: str, stale_after_s: float):
        self.path, self.token, self.stale_after_s = path, token, stale_after_s
        self._stop = threading.Event()
        self._thread = None

    # -- claiming --------------------------------------------------------------------------

    @classmethod
    def claim(cls, results_dir, key: str, stale_after_s: float | None = None) -> "CellLock | None":
        stale_after_s = DEFAULT_STALE_S if stale_after_s is None else float(stale_after_s)
        folder = locks_dir(results_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.lock"
        token = uuid.uuid4().hex
        if cls._create(path, token):
            return cls(path, token, stale_after_s)._start()
        # Held: take it over only if stale.  Judging and replacing happen under one mutex so two
        # runners can never both decide the same stale claim is theirs.
        with _takeover_mutex(folder):
            if not path.exists():
                pass
            elif not cls._is_stale(path, stale_after_s):
                return None
            else:
                log.warning("taking over stale claim %s (%s)", path.name, _describe(path))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if cls._create(path, token):
                return cls(path, token, stale_after_s)._start()
        return None

    @staticmethod
    def _create(path: Path, token: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "job": _job_id(),
                "token": token}
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    @staticmethod
    def _is_stale(path: Path, stale_after_s: float) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
            info = json.loads(path.read_text() or "null")
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict):  # killed between creating and writing the claim
            return age > min(EMPTY_LOCK_GRACE_S, stale_after_s)
        same_host = info.get("host") == socket.gethostname()
        if same_host and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
            return True
        job = _job_id()
        if job and info.get("job") == job and not (same_host and info.get("pid") != os.getpid()
                                                   and _pid_alive(info["pid"])):
            return True  # this very array task, requeued after preemption or timeout
        return age > stale_after_s

    # -- holding ---------------------------------------------------------------------------

    def _start(self) -> "CellLock":
        # Touch the file while we hold it, so age only grows when the holder is dead.
        interval = max(0.5, min(30.0, self.stale_after_s / 4))

        def beat():
            while not self._stop.wait(interval):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name=f"claim-{self.path.stem[:8]}", daemon=True)
        self._thread.start()
        return self

    def owned(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():  # never remove a claim someone else has taken over
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def _takeover_mutex(folder: Path):
    with open(folder / ".takeover.mutex", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info.get('pid')} on {info.get('host')}, job {info.get('job')}"
    except (OSError, ValueError):
        return "unreadable"


# ---------------------------------------------------------------------------------------------
# Executors


@dataclass(frozen=True)
class CellRunner:
    """What an executor needs from the runner, handed over by it (prunebench.run.runner.run_grid)."""

    # (grid, cells, results_dir, summary, **options): run cells here, counting them into summary
    run_in_process: Callable
    # (grid, cell, results_dir, error, lock_stale_s) -> outcome: the failed record of a cell that
    # was stopped from outside (its worker past the timeout, a SLURM task at its time limit)
    record_stopped: Callable


class LocalExecutor:
    """Cells run in this process, one model load per model.  With a per-cell timeout each cell
    runs in a worker process of its own instead (its model loaded per cell), so a cell that never
    returns can be stopped: it becomes a failed record and the grid goes on."""

    name = "local"

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = check_timeout(timeout_s)

    def run(self, grid, cells, results_dir, summary, runner: CellRunner, **options) -> None:
        if self.timeout_s is None:
            runner.run_in_process(grid, cells, results_dir, summary, **options)
            return
        for cell in cells:
            _count(summary, run_cell_in_worker(grid, cell, results_dir, runner, timeout_s=self.timeout_s, **options), cell)


class TorchrunExecutor:
    """Learned cells as `nproc_per_node` processes on this machine (torchrun, one per GPU, or
    gloo processes on a CPU); every other cell as the local executor runs it."""

    name = "torchrun"

    def __init__(self, nproc_per_node: int, timeout_s: float | None = None):
        if nproc_per_node < 2:
            raise UserError(f"--nproc-per-node must be 2 or more for a multi-process run, got {nproc_per_node}")
        self.nproc_per_node = nproc_per_node
        self.timeout_s = check_timeout(timeout_s)

    def run(self, grid, cells, results_dir, summary, runner: CellRunner, **options) -> None:
        learned = [c for c in cells if getattr(registry.get(c.method), "kind", None) == "learned"]
        others = [c for c in cells if c not in learned]
        if others:
            LocalExecutor(self.timeout_s).run(grid, others, results_dir, summary, runner, **options)
        for cell in learned:
            log.info("cell %s: %d processes (torchrun)", cell.label, self.nproc_per_node)
            outcome = run_cell_in_worker(grid, cell, results_dir, runner, timeout_s=self.timeout_s,
                                         nproc=self.nproc_per_node, **options)
            _count(summary, outcome, cell)


def check_timeout(timeout_s):
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise UserError(f"--timeout must be a positive number of minutes, got {timeout_s!r} seconds"[:200],
                        hint="e.g. --timeout 90 (minutes per cell)")
    return float(timeout_s)


STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL: time to leave a checkpoint


def run_cell_in_worker(grid, cell, results_dir, runner: CellRunner, *, timeout_s=None, nproc: int = 1, plugins=(),
                       progress=True, **options) -> dict:
    """Run one cell in a child process (`python -m prunebench.run.cell_worker`; with nproc > 1 under
    torchrun) and return its outcome.  The child is in a process group of its own and dies with
    this process (cell_worker.die_with_parent); after `timeout_s` seconds the group is stopped
    and the cell gets a failed record that says so."""
    import dataclasses
    import sys

    results_dir = Path(results_dir).resolve()
    work = results_dir / "work" / cell.key[:16]
    stem = "torchrun" if nproc > 1 else "worker"
    spec_path, outcome_path = work / f"{stem}_cell.json", work / f"{stem}_outcome.json"
    outcome_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, {"grid": dataclasses.asdict(grid), "results_dir": str(results_dir), "key": cell.key,
                                  "outcome": str(outcome_path), "replace": list(registry.replaceable()),
                                  "options": {**options, "progress": progress,
                                              "plugins": [str(Path(p).resolve()) for p in plugins]}})
    cmd = [sys.executable, "-m", "prunebench.run.cell_worker"]
    if nproc > 1:  # torchrun itself runs inside a cell_worker, so it too dies with this process
        cmd += ["--torchrun", "--standalone", f"--nproc-per-node={nproc}", "-m", "prunebench.run.cell_worker"]
    cmd.append(str(spec_path))
    # A group of its own: a timeout stops the worker and whatever it started, and nothing else.
    proc = subprocess.Popen(cmd, env={**os.environ, PARENT_PID_ENV: str(os.getpid())}, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # a timeout, Ctrl-C or any error here: the worker must not outlive its cell
        if proc.poll() is None:
            _stop_group(proc)
    if timed_out:
        return _timed_out(runner, grid, cell, results_dir, timeout_s, options.get("lock_stale_s"))
    try:
        outcome = json.loads(outcome_path.read_text())
    except (OSError, ValueError):
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
        return {"key": cell.key, "status": "failed",
                "error": f"the cell's {'torchrun' if nproc > 1 else 'worker'} process {how} before writing an outcome "
                         "(see its output above)"}
    if outcome.get("user_error"):  # the worker's one-line error (a full disk...) stops this runner too
        raise UserError(outcome["error"])
    return outcome


def _stop_group(proc) -> None:
    """SIGTERM to the worker's group (a learned method may checkpoint), SIGKILL after a grace."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _timed_out(runner: CellRunner, grid, cell, results_dir, timeout_s: float, lock_stale_s) -> dict:
    """The outcome of a cell stopped at its timeout: a failed record that says so."""
    error = (f"timed out: the cell exceeded the per-cell timeout of {timeout_s / 60:g} min (--timeout); "
             "its worker processes were stopped")
    return runner.record_stopped(grid, cell, results_dir, error, lock_stale_s)


SLURM_POLL_ENV = "PRUNEBENCH_SLURM_POLL_S"  # seconds between looks at the queue (tests: a fraction)
DEFAULT_SLURM_POLL_S = 30.0
# sacct states after which an array task will not run again (a requeued one is PENDING again)
SLURM_DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                     "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
SLURM_UNSEEN_POLLS = 5  # a task neither queued nor accounted for this many looks in a row: failed
OUTCOME_STATUSES = ("ok", "failed", "skipped", "busy")


class SlurmExecutor:
    """One SLURM job array per grid, through `sbatch`, `squeue` and `sacct` themselves.

    Nothing a job or anyone else leaves in the results directory is unpickled or executed here:
    each array task starts from a command line (`python -m prunebench.run.cell_worker --slurm
    ARRAY.json SHA256`) that names one JSON file of the grid and the cells' keys, whose sha256 is
    part of the batch script (sbatch keeps its own copy of the script, so the file cannot be
    swapped afterwards); the runner waits on the jobs' states and reads back only the strict-JSON
    outcome each task writes and its validated record.  A preempted task is requeued by SLURM
    (--requeue) and takes its own claim over (CellLock); `timeout_min` is each task's --time,
    and a task that reaches it gets a failed record that says so."""

    name = "slurm"

    def __init__(self, partition: str | None = None, gpus_per_cell: int = 0,
                 timeout_min: int = 240, array_parallelism: int | None = None, cpus_per_cell: int | None = None,
                 mem_gb: int | None = None, wait: bool = True, nproc_per_node: int = 1, poll_s: float | None = None):
        if gpus_per_cell is not None and gpus_per_cell < 0:
            raise UserError(f"--gpus-per-cell must be 0 or more, got {gpus_per_cell}")
        if timeout_min is not None and timeout_min <= 0:
            raise UserError(f"--timeout must be a positive number of minutes, got {timeout_min}")
        if array_parallelism is not None and array_parallelism < 1:
            raise UserError(f"--array-parallelism must be 1 or more, got {array_parallelism}")
        if nproc_per_node < 1:
            raise UserError(f"--nproc-per-node must be 1 or more, got {nproc_per_node}")
        self.partition, self.gpus_per_cell = partition, gpus_per_cell
        self.timeout_min, self.array_parallelism = timeout_min, array_parallelism
        self.cpus_per_cell, self.mem_gb, self.wait = cpus_per_cell, mem_gb, wait
        self.nproc_per_node = nproc_per_node
        if poll_s is None:
            try:
                poll_s = float(os.environ.get(SLURM_POLL_ENV, DEFAULT_SLURM_POLL_S))
            except ValueError:
                raise UserError(f"{SLURM_POLL_ENV} must be a number of seconds, "
                                f"got {os.environ.get(SLURM_POLL_ENV)!r}"[:200]) from None
        self.poll_s = max(0.05, poll_s)

    def sbatch_args(self, n_cells: int, logs: Path) -> list:
        array = f"0-{n_cells - 1}" + (f"%{self.array_parallelism}" if self.array_parallelism else "")
        args = ["--parsable", "--job-name=prunebench", f"--array={array}", f"--time={int(self.timeout_min)}",
                f"--output={logs}/%A_%a.out", f"--error={logs}/%A_%a.err", "--nodes=1",
                f"--ntasks-per-node={self.nproc_per_node}", "--requeue"]
        if self.partition:
            args.append(f"--partition={self.partition}")
        if self.gpus_per_cell:
            args.append(f"--gpus-per-node={self.gpus_per_cell}")
        if self.cpus_per_cell:
            args.append(f"--cpus-per-task={self.cpus_per_cell}")
        if self.mem_gb:
            args.append(f"--mem={self.mem_gb}G")
        return args

    def run(self, grid, cells, results_dir, summary, runner: CellRunner, *, plugins=(), progress=False,
            **options) -> None:
        import dataclasses
        import hashlib
        import shlex
        import sys

        if not cells:
            return
        results_dir = Path(results_dir).resolve()  # array tasks may start in another directory
        logs = results_dir / "slurm_logs"
        work = logs / f"array-{uuid.uuid4().hex[:12]}"
        work.mkdir(parents=True, exist_ok=True)
        spec = {"grid": dataclasses.asdict(grid), "results_dir": str(results_dir), "keys": [c.key for c in cells],
                "outcomes": str(work), "replace": list(registry.replaceable()),
                "options": {**options, "progress": False, "plugins": [str(Path(p).resolve()) for p in plugins]}}
        spec_path = atomic_write_json(work / "array.json", spec)
        digest = hashlib.sha256(spec_path.read_bytes()).hexdigest()
        command = [sys.executable, "-m", "prunebench.run.cell_worker", "--slurm", str(spec_path), digest]
        if self.nproc_per_node > 1:  # one task per GPU, each a rank of the cell's world
            command = ["srun", f"--ntasks={self.nproc_per_node}", *command]
        script = atomic_write_text(work / "array.sbatch", "#!/bin/bash\n# prunebench: one array task per cell "
                                   f"(the cells' keys are in {spec_path.name})\nexec {shlex.join(command)}\n")
        job = _slurm(["sbatch", *self.sbatch_args(len(cells), logs), str(script)]).split(";")[0].strip()
        if not job.isdigit():
            raise UserError(f"sbatch answered {job[:200]!r}, not a job id")
        log.info("submitted %d cells as job array %s; logs in %s", len(cells), job, logs)
        summary.job_ids = [f"{job}_{i}" for i in range(len(cells))]
        if not self.wait:
            summary.submitted = len(cells)
            return
        for cell, outcome in zip(cells, self._wait(job, cells, work, grid, results_dir, options, runner)):
            _count(summary, outcome, cell)

    def _wait(self, job: str, cells, work: Path, grid, results_dir: Path, options, runner: CellRunner) -> list:
        outcomes, unseen = {}, {}
        while len(outcomes) < len(cells):
            queued = {_task_index(t) for t in _slurm(["squeue", "-h", "-r", "-j", job, "-o", "%i"]).split()}
            states = None
            for index, cell in enumerate(cells):
                if index in outcomes:
                    continue
                path = work / f"{index}.outcome.json"
                if path.exists():  # read after the queue: a task gone from it has written its outcome by now
                    outcomes[index] = read_outcome(path, cell, results_dir)
                    continue
                if index in queued:
                    unseen.pop(index, None)
                    continue
                if states is None:
                    states = _sacct_states(job)
                state = states.get(index)
                if state in SLURM_DONE_STATES:
                    outcomes[index] = self._ended(f"{job}_{index}", state, cell, grid, results_dir, options, runner)
                elif state is None:  # accounting may lag the queue by a moment
                    unseen[index] = unseen.get(index, 0) + 1
                    if unseen[index] >= SLURM_UNSEEN_POLLS:
                        outcomes[index] = {"key": cell.key, "status": "failed",
                                           "error": f"job {job}_{index} left the queue without an outcome, and "
                                                    "sacct does not know it"}
            if len(outcomes) < len(cells):
                time.sleep(self.poll_s)
        return [outcomes[i] for i in range(len(cells))]

    def _ended(self, task: str, state: str, cell, grid, results_dir: Path, options, runner: CellRunner) -> dict:
        if state == "TIMEOUT":
            return _timed_out(runner, grid, cell, results_dir, self.timeout_min * 60.0, options.get("lock_stale_s"))
        return {"key": cell.key, "status": "failed",
                "error": f"job {task} ended {state} without an outcome (see {results_dir / 'slurm_logs' / task}.err)"}


def _slurm(command: list) -> str:
    """Run a SLURM command; its output, or a one-line UserError."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError(f"the slurm executor needs {command[0]!r}, which is not on PATH",
                        hint="run on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{command[0]} did not answer within 120 s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"{command[0]} failed ({done.returncode}): {last[:300]}")
    return done.stdout


def _task_index(task: str) -> int | None:
    """'1234_5' -> 5 (an array task's index); None for anything else (a pending range '1234_[6-9]')."""
    tail = task.rpartition("_")[2]
    return int(tail) if tail.isdigit() else None


def _sacct_states(job: str) -> dict:
    """index -> the first word of each array task's state (sacct says 'CANCELLED by 123')."""
    states = {}
    for line in _slurm(["sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,State"]).splitlines():
        task, _, state = line.partition("|")
        index = _task_index(task.strip())
        if index is not None and state.split():
            states[index] = state.split()[0].rstrip("+")
    return states


def read_outcome(path: Path, cell, results_dir: Path) -> dict:
    """A task's outcome file, as strict JSON of the expected shape, with the cell's validated
    record when it ran; anything else is the cell's failure, in one line."""
    try:
        outcome = json.loads(path.read_text(encoding="utf-8"), **strict_json_hooks(ValueError))
        if not isinstance(outcome, dict) or outcome.get("key") != cell.key or outcome.get("status") not in OUTCOME_STATUSES:
            raise ValueError("not an outcome of this cell")
        if not isinstance(outcome.get("error"), (str, type(None))):
            raise ValueError("its error is not text")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return {"key": cell.key, "status": "failed", "error": f"unreadable outcome {path.name}: {str(exc)[:200]}"}
    outcome = {"key": cell.key, "status": outcome["status"], "error": outcome.get("error"),
               "user_error": outcome.get("user_error") is True, "record": None}
    if outcome["status"] in ("ok", "failed"):
        with contextlib.suppress(OSError, ValueError):
            record = read_record(cell_record_path(results_dir, cell.model, cell.method, cell.sparsity_label, cell.key))
            if record.get("key") == cell.key and record.get("status") == outcome["status"]:
                outcome["record"] = record
    return outcome


def _count(summary, outcome: dict, cell) -> None:
    status = outcome.get("status")
    if status == "ok":
        summary.ok += 1
    elif status == "skipped":
        summary.skipped += 1
    elif status == "busy":
        summary.busy += 1
    else:
        summary.failed += 1
        log.error("cell failed: %s: %s", cell.label, outcome.get("error"))
    if outcome.get("record") is not None:
        summary.records.append(outcome["record"])
    elif status == "failed":
        summary.records.append({"key": cell.key, "status": "failed", "error": outcome.get("error"),
                                "model": {"id": cell.model}, "method": {"name": cell.method},
                                "sparsity": {"label": cell.sparsity_label}})


def make_executor(name: str, **options):
    if name in (None, "", "local"):
        nproc = options.get("nproc_per_node") or 1
        timeout_s = options.get("timeout_s")
        return TorchrunExecutor(nproc, timeout_s) if nproc > 1 else LocalExecutor(timeout_s)
    if name == "slurm":
        return SlurmExecutor(**options)
    raise UserError(f"unknown executor {name!r}", hint="use local or slurm")
