"""The SLURM executor, through fake `sbatch` / `squeue` / `sacct` commands on PATH that run each
array task here (so the real command lines and batch script are exercised), and the local
executors' worker processes."""
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from prunebench.cli.command import main
from prunebench.run.executors import SlurmExecutor, locks_dir
from prunebench.store.records import load_records

# Two quick cells (each an array task, a process of its own): enough for a task to run after
# the hostile files were planted again, and for the array range and its throttle to show.
GRID_YAML = """\
models: [tiny:llama, tiny:qwen2]
methods: [wanda]
sparsities: ["0.5"]
include_dense: false
calibration: {dataset: lee, n_samples: 4, seqlen: 64}
eval: {perplexity: [lee], seqlen: 64, tasks: [], max_ppl_windows: 16}
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PRUNEBENCH_NO_PROGRESS="1",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# A SLURM of one machine: sbatch runs the array's tasks one after another in the background
# (each under `timeout` for its --time, a minute being FAKE_SLURM_MINUTE_S seconds), squeue lists
# the tasks not yet ended, sacct every task's state.  FAKE_SLURM_AFTER runs after each task.
FAKE_SBATCH = r"""#!/bin/bash
set -u
D=$FAKE_SLURM_DIR
echo "sbatch $*" >> "$D/calls"
for a in "$@"; do
  case "$a" in
    --array=*) array=${a#--array=} ;;
    --time=*) minutes=${a#--time=} ;;
    --output=*) out=${a#--output=} ;;
    --error=*) err=${a#--error=} ;;
    --*) ;;
    *) script=$a ;;
  esac
done
job=$(cat "$D/next" 2>/dev/null || echo 1000); echo $((job + 1)) > "$D/next"
range=${array%%%*}; first=${range%-*}; last=${range#*-}
for i in $(seq "$first" "$last"); do echo PENDING > "$D/${job}_$i"; done
cp "$script" "$D/${job}.sbatch"  # sbatch keeps its own copy of the script
(
  for i in $(seq "$first" "$last"); do
    echo RUNNING > "$D/${job}_$i"
    o=${out//%A/$job}; o=${o//%a/$i}; e=${err//%A/$job}; e=${e//%a/$i}
    SLURM_JOB_ID=$((job + 1 + i)) SLURM_ARRAY_JOB_ID=$job SLURM_ARRAY_TASK_ID=$i       timeout -k 2 $((minutes * ${FAKE_SLURM_MINUTE_S:-60})) bash "$D/${job}.sbatch" > "$o" 2> "$e"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state=TIMEOUT; elif [ $rc -eq 0 ]; then state=COMPLETED; else state=FAILED; fi
    if [ -n "${FAKE_SLURM_AFTER:-}" ]; then bash -c "$FAKE_SLURM_AFTER"; fi
    echo $state > "$D/${job}_$i"
  done
) > /dev/null 2>&1 &
echo "$job"
"""
FAKE_SQUEUE = r"""#!/bin/bash
echo "squeue $*" >> "$FAKE_SLURM_DIR/calls"
while [ "$1" != -j ]; do shift; done; job=$2
for f in "$FAKE_SLURM_DIR/${job}"_*; do
  case "$(cat "$f")" in PENDING|RUNNING) basename "$f" ;; esac
done
"""
FAKE_SACCT = r"""#!/bin/bash
echo "sacct $*" >> "$FAKE_SLURM_DIR/calls"
while [ "$1" != -j ]; do shift; done; job=$2
for f in "$FAKE_SLURM_DIR/${job}"_*; do echo "$(basename "$f")|$(cat "$f")"; done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH and variables under which sbatch, squeue and sacct are the fakes above."""
    bin_dir, state = tmp_path / "fake_bin", tmp_path / "fake_slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(state),
                PRUNEBENCH_SLURM_POLL_S="0.3")


class Planted:
    """Unpickling this runs a shell command: what a hostile *.pkl in slurm_logs would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_job_array_through_sbatch_reads_no_pickle(tmp_path, fake_slurm, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID_YAML)
    results = tmp_path / "results"
    marker = tmp_path / "pickle_ran"
    hostile = pickle.dumps(Planted(marker))
    # submitit's file names, before the run and again after every task (a co-user of the folder)
    logs = results / "slurm_logs"
    for folder in (logs, logs / "1000_0", logs / "1000"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("1000_0_0_result.pkl", "1000_0_submitted.pkl", "1000_submission.pkl"):
            (folder / name).write_bytes(hostile)
    bad = tmp_path / "hostile.pkl"
    bad.write_bytes(hostile)
    env = dict(fake_slurm, FAKE_SLURM_AFTER=f"for d in {logs} {logs}/*/; do cp {bad} $d/1000_0_0_result.pkl; "
                                            f"cp {bad} $d/1000_0_submitted.pkl; done")
    cmd = [sys.executable, "-m", "prunebench.cli.command", "run", "--grid", str(grid), "--results", str(results), "-q",
           "--executor", "slurm", "--timeout", "10", "--array-parallelism", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 cells: 2 ran ok" in done.stdout
    assert not marker.exists()  # nothing in the results directory was unpickled, by the runner or a task

    calls = (tmp_path / "fake_slurm" / "calls").read_text().splitlines()
    [sbatch] = [c for c in calls if c.startswith("sbatch ")]
    assert "--array=0-1%1" in sbatch and "--time=10" in sbatch and "--requeue" in sbatch
    assert any(c.startswith("squeue ") for c in calls)
    script = next(logs.glob("array-*/array.sbatch")).read_text()
    assert "-m prunebench.run.cell_worker --slurm" in script and "pickle" not in script

    records, skipped = load_records(results)
    assert not skipped
    assert len(records) == 2 and len({r["key"] for r in records}) == 2
    assert all(r["status"] == "ok" for r in records)
    assert {(r["model"]["id"], r["method"]["name"]) for r in records} == {("tiny:llama", "wanda"), ("tiny:qwen2", "wanda")}
    assert len(list(logs.glob("1000_*.out"))) == 2  # one array task (its own process) per cell
    assert not list(locks_dir(results).glob("*.lock"))

    # resume stays keyed on the records: nothing is submitted again
    assert main(["run", "--grid", str(grid), "--results", str(results), "-q", "--executor", "slurm"]) == 0
    assert "0 ran ok, 2 skipped" in capsys.readouterr().out


HANGING_PLUGIN = """
import time
from dataclasses import dataclass
from prunebench import Capabilities, LayerwisePruner, LinearResult, STATS_NONE, register


@register
class Hang(LayerwisePruner):
    name = "hang"
    capabilities = Capabilities(needs_calibration=False, statistics=STATS_NONE)

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
        time.sleep(600)
"""


def test_a_task_past_its_time_is_a_failed_record_that_says_so(tmp_path, fake_slurm):
    plugin = tmp_path / "hang.py"
    plugin.write_text(textwrap.dedent(HANGING_PLUGIN))
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "prunebench.cli.command", "run", "--plugin", str(plugin), "--models", "tiny:llama",
           "--methods", "hang", "--no-dense", "--sparsities", "0.5", "--ppl", "lee", "--tasks", "none",
           "--results", str(results), "-q", "--executor", "slurm", "--timeout", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(fake_slurm, FAKE_SLURM_MINUTE_S="3"),
                          timeout=200)
    assert done.returncode == 1, done.stderr[-3000:]
    [record] = load_records(results)[0]
    assert record["status"] == "failed"
    assert record["error"].startswith("timed out: the cell exceeded the per-cell timeout of 1 min")


def test_a_task_whose_spec_changed_since_submission_refuses_to_run(tmp_path, fake_slurm):
    spec = tmp_path / "array.json"
    spec.write_text('{"grid": {}, "options": {}, "keys": ["k"], "outcomes": "."}')
    env = dict(fake_slurm, SLURM_ARRAY_TASK_ID="0")
    done = subprocess.run([sys.executable, "-m", "prunebench.run.cell_worker", "--slurm", str(spec), "0" * 64],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("changed since it was submitted (its sha256 is not the batch script's)")
    spec.write_text('{"grid": {}, "grid": {}, "options": {}}')  # not strict JSON: a name twice
    done = subprocess.run([sys.executable, "-m", "prunebench.run.cell_worker", str(spec)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "the name 'grid' twice" in done.stderr


def test_without_sbatch_the_slurm_executor_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands at all
    code = main(["run", "--models", "tiny:llama", "--methods", "magnitude", "--results", str(tmp_path / "r"), "-q",
                 "--executor", "slurm", "--no-dense"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "the slurm executor needs 'sbatch', which is not on PATH" in err and len(err.splitlines()) == 1


def test_executor_rejects_bad_options():
    from prunebench.errors import UserError

    with pytest.raises(UserError):
        SlurmExecutor(gpus_per_cell=-1)
    with pytest.raises(UserError, match="--timeout must be a positive"):
        SlurmExecutor(timeout_min=0)


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
