"""Several runners on one results directory, and runs killed mid-grid.

The end-to-end tests start real `python -m prunebench.cli.command run` processes on tiny models.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prunebench.run.executors import CellLock, locks_dir
from prunebench.store.records import load_records, record_files

from conftest import SIX_CELL_GRID_YAML as GRID_YAML  # noqa: E402
N_CELLS = 6  # 2 models x (dense, magnitude 0.5, wanda 0.5)


def grid_file(folder: Path) -> Path:
    path = folder / "grid.yaml"
    path.write_text(GRID_YAML)
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PRUNEBENCH_NO_PROGRESS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _start(results: Path, *extra) -> subprocess.Popen:
    grid = grid_file(results.parent)
    return subprocess.Popen([sys.executable, "-m", "prunebench.cli.command", "run", "--grid", str(grid), "-q",
                             "--results", str(results), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _ran_ok(stdout: str) -> int:
    # "6 cells: 3 ran ok, 0 skipped (already done), 0 failed; ..."
    line = [ln for ln in stdout.splitlines() if " ran ok, " in ln][-1]
    return int(line.split(": ", 1)[1].split(" ran ok")[0])


def _records_by_key(results: Path) -> dict:
    records, skipped = load_records(results)
    assert not skipped, f"unparseable records: {skipped}"
    by_key = {}
    for r in records:
        by_key.setdefault(r["key"], []).append(r)
    return by_key


# -- claims, in process ---------------------------------------------------------------------------

def _fake_claim(results, key, **info):
    path = locks_dir(results) / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "time": time.time(), "job": None,
                                "token": "someone-else", **info}))
    return path


def test_claim_is_exclusive_and_released(tmp_path):
    first = CellLock.claim(tmp_path, "k1")
    assert first is not None
    assert CellLock.claim(tmp_path, "k1") is None  # held by a live process (us)
    first.release()
    assert not (locks_dir(tmp_path) / "k1.lock").exists()
    again = CellLock.claim(tmp_path, "k1")
    assert again is not None
    again.release()


def test_stale_claims_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_claim(tmp_path, "dead-pid", pid=dead.pid)
    claim = CellLock.claim(tmp_path, "dead-pid")
    assert claim is not None and claim.owned()
    claim.release()

    # another host: its pid cannot be checked, only the age of the file counts
    path = _fake_claim(tmp_path, "other-host", pid=os.getpid(), host="elsewhere.invalid")
    assert CellLock.claim(tmp_path, "other-host", stale_after_s=60) is None
    old = time.time() - 120
    os.utime(path, (old, old))
    claim = CellLock.claim(tmp_path, "other-host", stale_after_s=60)
    assert claim is not None
    claim.release()

    # a claim file its writer never filled in (killed between open and write)
    path = locks_dir(tmp_path) / "empty.lock"
    path.write_text("")
    os.utime(path, (old, old))
    claim = CellLock.claim(tmp_path, "empty")
    assert claim is not None
    claim.release()


def test_release_never_removes_a_claim_taken_over(tmp_path):
    claim = CellLock.claim(tmp_path, "k")
    _fake_claim(tmp_path, "k", pid=os.getpid())  # as if another runner had taken it over
    claim.release()
    assert (locks_dir(tmp_path) / "k.lock").exists()


# -- real processes -------------------------------------------------------------------------------

def test_two_runners_share_a_grid(tmp_path):
    results = tmp_path / "results"
    procs = [_start(results), _start(results)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    by_key = _records_by_key(results)
    assert len(by_key) == N_CELLS
    assert all(len(v) == 1 and v[0]["status"] == "ok" for v in by_key.values())
    # no cell computed twice: between them the two runners ran each cell exactly once
    assert sum(_ran_ok(out) for out, _ in outs) == N_CELLS
    assert not list(locks_dir(results).glob("*.lock"))


def test_sigkill_mid_grid_then_resume(tmp_path):
    results = tmp_path / "results"
    proc = _start(results)
    deadline = time.time() + 180
    while len(record_files(results)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    before = {p.name: p.stat().st_mtime_ns for p in record_files(results)}
    assert 2 <= len(before) < N_CELLS, "the run finished before it could be killed"
    _records_by_key(results)  # every record left behind parses

    rerun = _start(results)
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err[-2000:]
    assert _ran_ok(out) == N_CELLS - len(before)  # only the missing cells were computed
    after = {p.name: p.stat().st_mtime_ns for p in record_files(results)}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished cells untouched
    by_key = _records_by_key(results)
    assert len(by_key) == N_CELLS and all(len(v) == 1 and v[0]["status"] == "ok" for v in by_key.values())
    assert not list(locks_dir(results).glob("*.lock"))  # the dead runner's claim was taken over and removed
