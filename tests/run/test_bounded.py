"""Bounded work and environment failures (issue 29): YAML that loads within limits, a per-cell
timeout for the local executor, worker processes that die with their runner, a full disk and
trust_remote_code answered plainly.  The one-line bad-input cases are in test_trust.py's table."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prunebench.cli.command import main
from prunebench.store.records import load_records

from conftest import REPO

TINY = ["--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "lee", "--tasks", "none",
        "--max-ppl-windows", "16", "-q"]

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


def files_under(folder: Path) -> dict:
    """Every file (claims aside) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


# ---------------------------------------------------------------------------------------------
# YAML: the limits refuse bombs, not what grids use

def test_merge_keys_and_shared_anchors_still_load():
    from prunebench.run.grid import load_yaml

    text = textwrap.dedent("""\
        base: &base {steps: 3, lr: 0.1}
        methods:
          - {name: leap, config: {<<: *base, steps: 5}}   # a merged key overridden: not a duplicate
          - {name: admm, config: *base}
        """)
    data = load_yaml(text, "test")
    assert data["methods"][0]["config"] == {"steps": 5, "lr": 0.1}
    assert data["methods"][1]["config"] == {"steps": 3, "lr": 0.1}


def test_every_shipped_grid_loads_as_before():
    import yaml

    from prunebench.run.grid import load_yaml

    repo = REPO
    files = sorted((repo / "prunebench" / "presets").glob("*.yaml")) + sorted((repo / "benchmarks" / "grids").glob("*.yaml"))
    assert files
    for path in files:
        assert load_yaml(path.read_bytes(), path.name) == yaml.safe_load(path.read_text()), path


def test_a_deep_bomb_is_refused_from_its_distinct_nodes():
    """Thirty anchors of ten aliases (10**30 items): refused from the 31 nodes, never expanded."""
    from prunebench.run.grid import load_yaml
    from prunebench.errors import UserError

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 30)]
    with pytest.raises(UserError, match="aliases expand it past"):
        load_yaml("\n".join(lines), "bomb")


# ---------------------------------------------------------------------------------------------
# trust_remote_code: warned about, and in the key only when true

def test_trust_remote_code_is_warned_about_and_in_the_key_only_when_true(monkeypatch, caplog):
    from prunebench.run import validate
    from prunebench.run.grid import grid_from_dict

    base = {"models": ["tiny:llama"], "methods": ["magnitude"], "include_dense": False,
            "calibration": {"n_samples": 4, "seqlen": 64}, "eval": {"perplexity": ["lee"], "seqlen": 64}}
    plain = grid_from_dict(dict(base)).cells()[0]
    said_false = grid_from_dict({**base, "trust_remote_code": False}).cells()[0]
    trusted = grid_from_dict({**base, "trust_remote_code": True}).cells()[0]
    assert "trust_remote_code" not in plain.identity() and said_false.key == plain.key
    assert trusted.identity()["trust_remote_code"] is True and trusted.key != plain.key
    monkeypatch.setattr(validate, "_WARNED_REMOTE_CODE", set())
    with caplog.at_level(logging.WARNING, logger="prunebench"):
        validate.check_grid(grid_from_dict({**base, "trust_remote_code": True}))
    assert any("trust_remote_code is true" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prunebench"):
        validate.check_grid(grid_from_dict(dict(base)))
    assert not any("trust_remote_code" in r.getMessage() for r in caplog.records)


def test_trust_remote_code_is_written_into_the_record(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: [tiny:llama]\nmethods: [magnitude]\ninclude_dense: false\ntrust_remote_code: true\n")
    results = tmp_path / "results"
    assert main(["run", "--grid", str(grid), "--results", str(results), *TINY]) == 0
    assert records_by_method(results)["magnitude"]["spec"]["trust_remote_code"] is True


# ---------------------------------------------------------------------------------------------
# A full disk: one line naming the path and the cause; no masks file without its record

def _full_disk_on(monkeypatch, what: str):
    """Make the record write (or the masks write) fail as a full disk does."""
    from prunebench.store import records

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if what == "record":
        real = records.atomic_write_text

        def write(path, text):
            if Path(path).parent.name == "records" and str(path).endswith(".json"):
                no_space(path)
            return real(path, text)

        monkeypatch.setattr(records, "atomic_write_text", write)
    else:
        import safetensors.torch

        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a file")  # what a full disk leaves behind
            no_space(filename)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("what", ["record", "masks"])
def test_a_full_disk_is_one_line_and_keeps_every_record(tmp_path, monkeypatch, capsys, what):
    results = tmp_path / "results"
    # a finished cell first: it must come through untouched
    assert main(["run", "--models", "tiny:llama", "--methods", "magnitude", "--results", str(results), *TINY]) == 0
    before = files_under(results / "records")
    assert any(name.endswith(".json") for name in before)
    capsys.readouterr()
    _full_disk_on(monkeypatch, what)
    code = main(["run", "--models", "tiny:llama", "--methods", "magnitude,wanda", "--save-masks",
                 "--results", str(results), *TINY])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prunebench: error: cannot write ") and "No space left on device" in err[0]
    assert str(results / "records") in err[0]  # the path
    assert files_under(results / "records") == before  # no new masks file, no half file, old records intact


# ---------------------------------------------------------------------------------------------
# A per-cell timeout for the local executor

def test_a_cell_past_its_timeout_is_a_failed_record_and_the_grid_goes_on(tmp_path, monkeypatch):
    from prunebench.plugins import load_plugin
    from prunebench.run.grid import grid_from_dict
    from prunebench.run.executors import LocalExecutor
    from prunebench.run.runner import run_grid

    plugin = sleeper_plugin(tmp_path, "sleeper_timeout_test")
    monkeypatch.setenv("PB_TEST_PIDS", str(tmp_path / "pids"))
    load_plugin(plugin)
    grid = grid_from_dict({"models": ["tiny:llama"], "methods": ["sleeper_timeout_test", "magnitude"],
                           "include_dense": False, "calibration": {"n_samples": 4, "seqlen": 64},
                           "eval": {"perplexity": ["lee"], "seqlen": 64, "max_ppl_windows": 4}})
    results = tmp_path / "results"
    summary = run_grid(grid, results, progress=False, executor=LocalExecutor(timeout_s=20), plugins=[plugin])
    recs = records_by_method(results)
    stuck = recs["sleeper_timeout_test"]
    assert stuck["status"] == "failed" and "exceeded the per-cell timeout" in stuck["error"]
    assert "magnitude" in recs  # the next cell ran (ok, unless this machine is too slow for 20 s)
    assert summary.failed >= 1 and summary.ok + summary.failed == 2
    # the stopped worker is gone
    pid = int((tmp_path / "pids").read_text().split()[0])
    assert wait_until_gone(pid, 60)


def test_timeout_on_the_command_line_runs_cells_in_workers(tmp_path, capsys):
    """--timeout is accepted by the local executor and the cells still come out ok (each in a worker)."""
    results = tmp_path / "results"
    assert main(["run", "--models", "tiny:llama", "--methods", "magnitude", "--no-dense", "--timeout", "30",
                 "--results", str(results), *TINY]) == 0
    assert records_by_method(results)["magnitude"]["status"] == "ok"
    assert (next((results / "work").iterdir()) / "worker_outcome.json").is_file()  # it ran in a worker


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


def test_the_worker_spec_carries_replace_so_a_replacing_plugin_loads_in_the_worker(tmp_path):
    """--replace NAME reaches the worker (it loads the plugins again): without it the worker
    would refuse the plugin's name."""
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
