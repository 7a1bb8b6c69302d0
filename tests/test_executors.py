"""The submitit executor: a real job array through submitit's local backend (subprocesses)."""
import os
import pickle
import subprocess
import sys

import pytest

pytest.importorskip("submitit")

from prunebench.cli.command import main
from prunebench.run.grid import grid_from_dict
from prunebench.run.executors import CellTask, SubmititExecutor, locks_dir
from prunebench.store.records import load_records

from conftest import SIX_CELL_GRID_YAML as GRID_YAML  # noqa: E402


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PRUNEBENCH_NO_PROGRESS="1",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_job_array_through_submitit_local(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID_YAML)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "prunebench.cli.command", "run", "--grid", str(grid), "--results", str(results), "-q",
           "--executor", "slurm", "--submitit-cluster", "local", "--timeout", "10", "--array-parallelism", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 cells: 6 ran ok" in done.stdout

    records, skipped = load_records(results)
    assert not skipped
    assert len(records) == 6 and len({r["key"] for r in records}) == 6
    assert all(r["status"] == "ok" for r in records)
    assert {(r["model"]["id"], r["method"]["name"]) for r in records} == {
        (m, k) for m in ("tiny:llama", "tiny:qwen2") for k in ("dense", "magnitude", "wanda")}
    # one array task (its own process, its own submitit job folder) per cell
    assert len(list((results / "slurm_logs").glob("*/*_result.pkl"))) == 6
    assert not list(locks_dir(results).glob("*.lock"))

    # resume stays keyed on the records: nothing is submitted again (in process: nothing to spawn)
    assert main(["run", "--grid", str(grid), "--results", str(results), "-q", "--executor", "slurm",
                 "--submitit-cluster", "local"]) == 0
    assert "0 ran ok, 6 skipped" in capsys.readouterr().out

    assert main(["report", "--results", str(results), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    for name in ("tiny:llama", "tiny:qwen2", "Dense", "Magnitude", "Wanda"):
        assert name in table


def test_cell_task_checkpoint_requeues_the_same_cell(tmp_path):
    # The key fingerprints the evaluated text, so the grid names text that is here (not the hub's).
    data = {"models": ["tiny:llama"], "methods": ["magnitude"], "sparsities": ["0.5"], "eval": {"perplexity": ["lee"]}}
    grid = grid_from_dict(data)
    key = grid.cells()[1].key
    task = CellTask(data, str(tmp_path), key, {"force": False})
    import submitit

    assert isinstance(task, submitit.helpers.Checkpointable)
    delayed = task.checkpoint()
    assert delayed.function is task  # the same cell, with the same options, goes back in the queue
    clone = pickle.loads(pickle.dumps(task))  # what submitit sends to the array task
    assert clone.key == key and clone.results_dir == str(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--timeout", "0"], "--timeout must be a positive"),  # a per-cell timeout for the local executor too
    (["--gpus-per-cell", "1"], "only apply to --executor slurm"),
    (["--executor", "slurm", "--timeout", "0"], "--timeout must be a positive"),
    (["--executor", "slurm", "--array-parallelism", "0"], "--array-parallelism must be 1 or more"),
    (["--lock-timeout", "-1"], "--lock-timeout must be positive"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be 1 or more"),
])
def test_bad_executor_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    code = main(["run", "--models", "tiny:llama", "--methods", "magnitude", "--results", str(tmp_path), "-q", *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_executor_rejects_bad_options():
    from prunebench.errors import UserError

    with pytest.raises(UserError):
        SubmititExecutor(gpus_per_cell=-1)


TORCHRUN_GRID_YAML = """
models: [tiny:llama]
methods:
  - {name: leap, config: {preset: tiny, steps: 2, batch_size: 2, grad_accum: 2, seqlen: 32, heldout_windows: 2, prior_method: magnitude}}
  - magnitude
sparsities: ["0.5"]
calibration: {dataset: lee, n_samples: 4, seqlen: 32}
eval: {perplexity: [lee], seqlen: 64, max_ppl_windows: 2, tasks: []}
"""


def test_a_learned_cell_runs_as_two_processes_through_torchrun(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(TORCHRUN_GRID_YAML)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "prunebench.cli.command", "run", "--grid", str(grid), "--results", str(results), "-q",
           "--nproc-per-node", "2", "--no-dense"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 cells: 2 ran ok" in done.stdout, done.stdout
    records, _ = load_records(results)
    by_method = {r["method"]["name"]: r for r in records}
    assert by_method["leap"]["status"] == "ok" and by_method["magnitude"]["status"] == "ok"
    assert by_method["leap"]["method"]["stats"]["processes"] == 2  # trained by both processes
    assert "processes" not in by_method["magnitude"]["method"]["stats"]  # a one-shot cell runs in the runner
    assert not list(locks_dir(results).glob("*.lock"))
