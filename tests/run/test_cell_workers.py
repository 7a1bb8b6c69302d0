"""Cells in worker processes: a per-cell timeout for the local executor (a cell past it is a
failed record, its worker stopped, the grid goes on), workers that die with their runner (a plain
worker, torchrun and its processes; a parent already gone), and a worker that loads the run's
plugins again, --replace included."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from prunebench.store.records import load_records

from tiny_runs import TINY

# Long enough for a tiny cell in a worker of its own (a few seconds), short enough not to wait long
# on the cell that never returns.
CELL_TIMEOUT_S = 8

# A method whose prune never returns; it notes its pid first, so a test can watch the process.
SLEEPER = '''
import os, time
from dataclasses import dataclass
from prunebench import Capabilities, Pruner, PruneReport, register

@register
class {cls}(Pruner):
    name = "{name}"
    kind = "{kind}"
    capabilities = Capabilities(patterns=("unstructured",), needs_calibration=False)

    @dataclass
    class Config:
        pass

    def prune(self, model, ctx):
        with open(os.environ["PB_TEST_PIDS"], "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        while True:
            time.sleep(1)
'''


def sleeper_plugin(tmp_path, name, kind="other"):
    path = tmp_path / f"{name}.py"
    path.write_text(SLEEPER.format(cls=name.title().replace("_", ""), name=name, kind=kind))
    return path


def records_by_method(results):
    return {r["method"]["name"]: r for r in load_records(results)[0]}


# ---------------------------------------------------------------------------------------------
# A per-cell timeout for the local executor

def test_a_cell_past_its_timeout_is_a_failed_record_and_the_grid_goes_on(tmp_path, monkeypatch):
    from prunebench.plugins import load_plugin
    from prunebench.run import executors
    from prunebench.run.grid import grid_from_dict
    from prunebench.run.runner import run_grid

    plugin = sleeper_plugin(tmp_path, "sleeper_timeout_test")
    monkeypatch.setenv("PB_TEST_PIDS", str(tmp_path / "pids"))
    load_plugin(plugin)
    workers = []  # the worker process of each cell, as the executor starts them

    class Spy(subprocess.Popen):
        def __init__(self, cmd, *args, **kwargs):
            super().__init__(cmd, *args, **kwargs)
            if "prunebench.run.cell_worker" in cmd:
                workers.append(self.pid)

    # the executor's own view of subprocess, with the spy as its Popen
    monkeypatch.setattr(executors, "subprocess", types.SimpleNamespace(**{**vars(subprocess), "Popen": Spy}))
    grid = grid_from_dict({"models": ["tiny:llama"], "methods": ["sleeper_timeout_test", "magnitude"],
                           "include_dense": False, "calibration": {"n_samples": 4, "seqlen": 64},
                           "eval": {"perplexity": ["lee"], "seqlen": 64, "max_ppl_windows": 4}})
    results = tmp_path / "results"
    summary = run_grid(grid, results, progress=False, executor=executors.LocalExecutor(timeout_s=CELL_TIMEOUT_S),
                       plugins=[plugin])
    recs = records_by_method(results)
    stuck = recs["sleeper_timeout_test"]
    assert stuck["status"] == "failed" and "exceeded the per-cell timeout" in stuck["error"]
    assert "magnitude" in recs  # the next cell ran (ok, unless this machine is too slow for its timeout)
    assert summary.failed >= 1 and summary.ok + summary.failed == 2
    # the stopped worker is gone (the one the sleeping method ran in, where it got that far)
    assert len(workers) == 2
    if (tmp_path / "pids").exists():
        assert int((tmp_path / "pids").read_text().split()[0]) == workers[0]
    assert wait_until_gone(workers[0], 60)


# ---------------------------------------------------------------------------------------------
# Workers die with their runner

def gone(pid: int) -> bool:
    """Exited (a zombie counts: nothing of it runs; in a container nobody may reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def wait_until_gone(pid: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.2)
    return gone(pid)


def _kill_runner_and_watch(tmp_path, plugin, method, n_workers, extra):
    """Start `prunebench run` on a cell that never returns, wait until its worker(s) are in the
    method, kill the runner with SIGKILL and return the workers' pids and whether they all went."""
    pids = tmp_path / "pids"
    runner = subprocess.Popen(
        [sys.executable, "-m", "prunebench.cli.command", "run", "--plugin", str(plugin), "--models", "tiny:llama",
         "--methods", method, "--no-dense", "--results", str(tmp_path / "results"), *TINY, *extra],
        env={**os.environ, "PB_TEST_PIDS": str(pids), "PRUNEBENCH_NO_PROGRESS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and runner.poll() is None:
            workers = [int(x) for x in pids.read_text().split()] if pids.exists() else []
            if len(workers) >= n_workers:
                break
            time.sleep(0.5)
        assert len(workers) >= n_workers, f"the workers never started (runner exit {runner.poll()})"
        runner.kill()
        runner.wait()
        return workers, all(wait_until_gone(pid, 60) for pid in workers)
    finally:  # never leave this test's processes behind, whatever failed
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_runner_takes_its_cell_worker_with_it(tmp_path):
    plugin = sleeper_plugin(tmp_path, "sleeper_worker_test")
    workers, all_gone = _kill_runner_and_watch(tmp_path, plugin, "sleeper_worker_test", 1, ["--timeout", "60"])
    assert all_gone, f"worker {workers} outlived its runner"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_runner_takes_torchrun_and_its_workers_with_it(tmp_path):
    plugin = sleeper_plugin(tmp_path, "sleeper_torchrun_test", kind="learned")
    workers, all_gone = _kill_runner_and_watch(tmp_path, plugin, "sleeper_torchrun_test", 2, ["--nproc-per-node", "2"])
    assert all_gone, f"torchrun workers {workers} outlived their runner"


def test_a_worker_whose_parent_already_died_exits_at_once():
    """The parent may die before the worker asks for the signal: the worker must notice."""
    probe = "from prunebench.run.cell_worker import die_with_parent; die_with_parent(); print('running')"
    mine = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PRUNEBENCH_PARENT_PID": str(os.getpid())})
    assert mine.returncode == 0 and "running" in mine.stdout
    if sys.platform.startswith("linux"):
        orphan = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                env={**os.environ, "PRUNEBENCH_PARENT_PID": "1" if os.getpid() != 1 else "2"})
        assert orphan.returncode != 0 and "running" not in orphan.stdout


def test_timeout_on_the_command_line_runs_the_cell_in_a_worker_that_loads_the_replacing_plugin(tmp_path):
    """--timeout is accepted by the local executor and the cell still comes out ok, run in a worker;
    --replace NAME reaches the worker (it loads the plugins again): without it the worker would
    refuse the plugin's name."""
    plugin = tmp_path / "my_magnitude.py"
    plugin.write_text(textwrap.dedent('''
        from prunebench import register
        from prunebench.methods.magnitude import Magnitude

        @register(name="magnitude")
        class MyMagnitude(Magnitude):
            pass
    '''))
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "prunebench.cli.command", "run", "--plugin", str(plugin), "--replace", "magnitude",
                           "--models", "tiny:llama", "--methods", "magnitude", "--no-dense", "--timeout", "30",
                           "--results", str(results), *TINY], capture_output=True, text=True,
                          env={**os.environ, "PRUNEBENCH_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rec = records_by_method(results)["magnitude"]
    assert rec["status"] == "ok" and rec["spec"]["method_identity"]["kind"] == "plugin"
    assert json.loads(next((results / "work").rglob("worker_cell.json")).read_text())["replace"] == ["magnitude"]
    assert (next((results / "work").iterdir()) / "worker_outcome.json").is_file()  # it ran in a worker
