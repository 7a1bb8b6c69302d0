"""Mask learning across processes (prunebench.engines.distributed, the engine in prunebench.engines.masklearn):
two gloo processes on a CPU compute what one process with the same global gradient
accumulation computes, and a preempted two-process run resumes to the mask of an uninterrupted one;
likewise with the optimizer state or the logits sharded over the processes.  Every two-process
run of the module runs in one pair of processes (the `runs` fixture).
"""
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prunebench.engines import masklearn
from prunebench import registry
from prunebench.data.windows import WindowSpec, calibration_windows
from prunebench.engines.distributed import DataParallel
from prunebench.errors import UserError
from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix
from prunebench.contract import PruneContext
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.engines.state_files import read_state

# LEAP on a tiny Llama: 4 steps of 4 sequences, one sequence per micro-batch (so one mask draw
# per sequence, as the authors' code draws), the held-out curve on 2 windows.
CONFIG = {"preset": "tiny", "steps": 4, "batch_size": 4, "grad_accum": 4, "seqlen": 32, "heldout_windows": 2,
          "heldout_every": 2, "final_mask": "topk", "checkpoint_every": 2}
TARGET = "0.5"
# Two processes add the same per-sequence gradients in another order (an all-reduce of two
# partial sums instead of one running sum): float32 rounding, so the logits agree to about 1e-6
# and a mask may differ only where two logits are that close (none did on this model).
LOGIT_ATOL = 1e-5
MASK_AGREEMENT = 0.999


def _context(loaded, work_dir=None):
    calib, _ = calibration_windows(loaded.tokenizer, WindowSpec("lee", 8, 64, 0))
    return PruneContext(sparsity=SparsitySpec.parse(TARGET), calibration=calib, seed=0, progress=False,
                        registry=registry, tokenizer=loaded.tokenizer, calibration_dataset="lee", work_dir=work_dir)


def _train(config, work_dir=None):
    loaded = load_tiny("llama")
    report = registry.create("leap", config).prune(loaded.model, _context(loaded, work_dir))
    masks = {n: (weight_matrix(m) != 0).clone() for n, m in all_prunable(loaded.model).items()}
    return masks, report


# Each setting (plain data parallel, sharded optimizer state, sharded logits) three times: trained
# through, cut at step 2 (a preemption after the checkpoint), then resumed from the cut's state.
# SETTINGS: name -> config.
SETTINGS = {"plain": CONFIG, "zero": dict(CONFIG, shard_optimizer_state=True), "fsdp": dict(CONFIG, shard_logits=True)}
CUT_AT = 2


def _jobs(root):
    """What the two processes run, in order: for each setting the full run, the cut (its state
    copied aside for the tests to read) and the resumed run, each checkpointing into a folder."""
    jobs = []
    for name, config in SETTINGS.items():
        jobs += [{"name": f"{name}_full", "config": config, "work_dir": str(root / f"{name}_full_work")},
                 {"name": f"{name}_cut", "config": config, "work_dir": str(root / f"{name}_cut_work"), "preempt_at": CUT_AT,
                  "copy_state_to": str(root / f"{name}_state_at_cut")},
                 {"name": f"{name}_resumed", "config": config, "work_dir": str(root / f"{name}_cut_work")}]
    return jobs


def _worker(rank, world, store_file, out_dir, jobs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        for job in jobs:
            _run_job(rank, out_dir, **job)
    finally:
        dist.destroy_process_group()


def _run_job(rank, out_dir, name, config, work_dir, preempt_at=None, copy_state_to=None):
    original = masklearn.LearnedMaskPruner._checkpoint
    if preempt_at is not None:
        def preempt(self, dp, path, run_key, logits, optimizer, scheduler, step, curves):
            original(self, dp, path, run_key, logits, optimizer, scheduler, step, curves)
            if step == preempt_at:
                raise KeyboardInterrupt("preempted")

        masklearn.LearnedMaskPruner._checkpoint = preempt
    try:
        masks, report = _train(config, work_dir)
    except KeyboardInterrupt:  # both processes stop at the same step, their shards written
        dist.barrier()
        if rank == 0:
            shutil.copytree(work_dir, copy_state_to)
        dist.barrier()
        return
    finally:
        masklearn.LearnedMaskPruner._checkpoint = original
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    torch.save({"masks": masks, "warnings": report.warnings, "stats": {k: report.stats.get(k) for k in
                                          ("processes", "micro_batches_per_process", "heldout_loss",
                                           "resumed_from_step", "curves", "logits_bytes",
                                           "logits_bytes_per_process")}},
               os.path.join(out_dir, name, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every job of _jobs in one pair of gloo processes (spawning them is the slow part): the
    saved results by job name (a cut job has none) and the folder that holds the work folders."""
    root = tmp_path_factory.mktemp("two")
    jobs = _jobs(root)
    mp.spawn(_worker, args=(2, str(root / "store"), str(root / "out"), jobs), nprocs=2, join=True)
    # (this test's own result files: tensors and plain values, read without unpickling code)
    results = {job["name"]: [torch.load(root / "out" / job["name"] / f"rank{r}.pt", weights_only=True) for r in range(2)]
               for job in jobs if (root / "out" / job["name"] / "rank0.pt").exists()}
    return results, root


def test_two_processes_learn_what_one_process_learns(tmp_path, runs):
    one_masks, one_report = _train(CONFIG, tmp_path / "one")
    two = runs[0]["plain_full"]
    assert two[0]["stats"]["processes"] == 2 and two[0]["stats"]["micro_batches_per_process"] == 2
    for name, mask in one_masks.items():
        assert torch.equal(two[0]["masks"][name], two[1]["masks"][name]), f"{name}: the processes disagree"
    agree = sum(int((two[0]["masks"][n] == m).sum()) for n, m in one_masks.items())
    total = sum(m.numel() for m in one_masks.values())
    assert agree / total >= MASK_AGREEMENT, f"masks agree on {agree / total:.6f} of weights"
    # the logged losses are the same sums over all micro-batches
    one_loss, two_loss = one_report.stats["curves"]["loss"], two[0]["stats"]["curves"]["loss"]
    assert two_loss == pytest.approx(one_loss, rel=1e-4, abs=1e-5)
    assert two[0]["stats"]["heldout_loss"] == pytest.approx(one_report.stats["heldout_loss"], rel=1e-4)


def _shards_at_cut(work_dir, step):
    """The sharded checkpoint a preempted two-process run left: the pointer and one file per
    process, each (strict JSON metadata, tensors) in safetensors."""
    pointer = json.loads((work_dir / "leap_state.latest.json").read_text())
    assert pointer["step"] == step and pointer["world"] == 2
    shard_dir = work_dir / pointer["dir"]
    assert sorted(p.name for p in shard_dir.iterdir()) == ["rank0.safetensors", "rank1.safetensors"]
    shards = [read_state(shard_dir / f"rank{r}.safetensors") for r in range(2)]
    assert [p.name for p in work_dir.iterdir() if p.name.startswith("leap_state.step")] == [shard_dir.name]
    assert not (work_dir / "leap_state.safetensors").exists()  # no gathered single-file copy
    return shards


def _cut_and_resumed(runs, setting):
    """The state the cut run left (as it was at the cut), after checking the cut ended the run;
    and whether the resumed run ended with the uninterrupted mask and left no state."""
    results, root = runs
    assert f"{setting}_cut" not in results  # preempted: neither process finished
    shards = _shards_at_cut(root / f"{setting}_state_at_cut", CUT_AT)
    resumed, uninterrupted = results[f"{setting}_resumed"], results[f"{setting}_full"]
    assert resumed[0]["stats"]["resumed_from_step"] == CUT_AT, resumed[0]["warnings"]
    for name, mask in uninterrupted[0]["masks"].items():
        assert torch.equal(resumed[0]["masks"][name], mask), name
    assert not any((root / f"{setting}_cut_work").iterdir())  # a finished run leaves no state to resume from
    return shards


def test_a_resumed_two_process_run_ends_with_the_uninterrupted_mask(runs):
    (meta0, _), (meta1, tensors1) = _cut_and_resumed(runs, "plain")
    assert meta0["logits"] and meta0["optimizer"]["state"]  # replicated: rank 0 writes it once
    assert "logits" not in meta1 and "optimizer" not in meta1 and not tensors1


def test_sharded_optimizer_state_is_saved_by_each_process_and_resumes(runs):
    """shard_optimizer_state: each process writes only its own AdamW moments (together they are
    every logit's, once), and the resumed run ends where the uninterrupted one does."""
    shards = _cut_and_resumed(runs, "zero")
    assert [meta["mode"] for meta, _ in shards] == ["zero", "zero"] and "logits" not in shards[1][0]
    moments = [len(meta["optimizer"]["state"]) for meta, _ in shards]  # each process: its own moments
    n_logits = sum(len(keys) for _, keys in shards[0][0]["logits"])
    assert min(moments) > 0 and sum(moments) == n_logits, (moments, n_logits)


def test_sharded_logits_learn_what_one_process_learns_and_resume(tmp_path, runs):
    """shard_logits (FSDP2): each process holds half the logits, the two learn the mask one
    process learns (the gradients are reduce-scattered every micro-batch, so summed in another
    order: the same tolerance), each writes only its shards, and a preempted run resumes to the
    uninterrupted mask."""
    config = SETTINGS["fsdp"]
    one_masks, one_report = _train(dict(config), tmp_path / "one")  # one process: nothing to shard
    two = runs[0]["fsdp_full"]
    stats = two[0]["stats"]
    assert stats["logits_bytes"] == one_report.stats["logits_bytes"]
    assert stats["logits_bytes_per_process"] == pytest.approx(stats["logits_bytes"] / 2, rel=0.05)
    for name, mask in one_masks.items():
        assert torch.equal(two[0]["masks"][name], two[1]["masks"][name]), f"{name}: the processes disagree"
    agree = sum(int((two[0]["masks"][n] == m).sum()) for n, m in one_masks.items())
    assert agree / sum(m.numel() for m in one_masks.values()) >= MASK_AGREEMENT
    assert stats["curves"]["loss"] == pytest.approx(one_report.stats["curves"]["loss"], rel=1e-4, abs=1e-5)

    shards = _cut_and_resumed(runs, "fsdp")
    layout = shards[0][0]["layout"]
    for name, keys in layout.items():  # each process holds its own shard of every logit: no gathered copy
        for key, (shape, _) in keys.items():
            rows = [tensors[f"logits/{name}/{key}"].shape for _, tensors in shards]
            assert sum(r[0] for r in rows) == shape[0] and all(list(r[1:]) == shape[1:] for r in rows)
            assert all(r[0] < shape[0] for r in rows)
    assert all(meta["optimizer"]["state"] for meta, _ in shards)  # and of its moments


def test_sharding_the_logits_and_the_moments_twice_is_refused():
    with pytest.raises(UserError, match="two ways of sharding"):
        registry.create("leap", dict(CONFIG, shard_logits=True, shard_optimizer_state=True))


def test_a_step_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(UserError, match="do not split over 2 processes"):
        DataParallel(rank=0, world=2).micro_batches(3, "LEAP")
    assert list(DataParallel(rank=1, world=2).micro_batches(4, "LEAP")) == [2, 3]
    assert list(DataParallel().micro_batches(4, "LEAP")) == [0, 1, 2, 3]


def test_logit_holder_keeps_the_layer_major_insertion_order():
    # The clipped gradient norm sums the parameters' norms in this order; a sorted order (what
    # nn.ParameterDict does to a plain dict) changed PATCH's learned masks by rounding.
    from prunebench.engines.distributed import LogitHolder

    logits = {layer: {key: torch.nn.Parameter(torch.full((2,), float(10 * i + j)))
                      for j, key in enumerate(("T", "G", "A"))} for i, layer in enumerate(("b.q", "a.k"))}
    holder = LogitHolder(logits)
    assert [p[0].item() for p in holder.trainable()] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    assert list(holder.full()["b.q"]) == ["T", "G", "A"]
