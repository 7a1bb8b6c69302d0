"""Peak memory and step time of LEAP's training on one process vs several (torch.distributed).

Each configuration runs as its own torchrun world: N processes (one per GPU, or gloo processes
on a CPU) train LEAP for a few steps on the same model and report, per process, the peak memory
(torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU) and the median
optimizer-step time, beside the bytes of logits and optimizer state the engine counts per
process.  Configurations: 1 process; N processes; N processes with the AdamW moments sharded
(shard_optimizer_state, torch's ZeroRedundancyOptimizer); N processes with the logits, their
gradients and moments sharded (shard_logits, FSDP2).  One global batch for all of them
(grad_accum micro-batches of one sequence), so the step does the same work.  `--optimizer
adamw-8bit` runs every configuration with 8-bit moments (torchao) instead; ZeRO is skipped then.

    python benchmarks/learned_parallel.py                                  # CPU, 2 gloo processes, SmolLM2-135M
    python benchmarks/learned_parallel.py --device cuda --nproc 4 --dtype bfloat16
    python benchmarks/learned_parallel.py --model tiny:llama --steps 3      # a quick smoke run
    python benchmarks/learned_parallel.py --optimizer adamw-8bit

Prints one table; `--out FILE` also writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    """One process of one configuration (run under torchrun)."""
    import resource

    import torch

    from prunebench.engines import distributed
    from prunebench import registry
    from prunebench.data.windows import WindowSpec, calibration_windows
    from prunebench.modeling.models import load_model
    from prunebench.contract import PruneContext
    from prunebench.sparsity.patterns import SparsitySpec

    distributed.init_from_environment(args.device)
    dp = distributed.DataParallel.current()
    loaded = load_model(args.model, dtype=args.dtype)
    loaded.model.to(args.device)
    calib, _ = calibration_windows(loaded.tokenizer, WindowSpec("lee", 16, args.seqlen, 0))
    config = {"preset": "embedded", "steps": args.steps, "batch_size": args.batch, "grad_accum": args.batch,
              "seqlen": args.seqlen, "heldout_windows": 0, "heldout_every": 0, "checkpoint_every": 0,
              "shard_optimizer_state": args.shard == "optimizer", "shard_logits": args.shard == "logits",
              "optimizer": args.optimizer, "logits_dtype": "bfloat16" if args.dtype == "bfloat16" else "float32"}
    step_times = []
    pruner = registry.create("leap", config)
    scheduler_step = torch.optim.lr_scheduler.LambdaLR.step
    last = [None]

    def timed_step(self, *a, **kw):  # the engine steps the lr schedule once per optimizer step
        out = scheduler_step(self, *a, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        if last[0] is not None:
            step_times.append(now - last[0])
        last[0] = now
        return out

    torch.optim.lr_scheduler.LambdaLR.step = timed_step
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ctx = PruneContext(sparsity=SparsitySpec.parse("0.5"), calibration=calib, device=args.device, seed=0,
                       progress=False, registry=registry, tokenizer=loaded.tokenizer, calibration_dataset="lee")
    stats = pruner.prune(loaded.model, ctx).stats
    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # the first interval runs from the scheduler's construction (the prior and set-up) to step 1
    steps = step_times[1:]
    row = {"rank": dp.rank, "processes": dp.world, "shard": args.shard, "peak_gb": round(peak / 1e9, 3),
           "median_step_s": round(statistics.median(steps), 3) if steps else None,
           "logits_mb": round(stats.get("logits_bytes_per_process", stats["logits_bytes"]) / 1e6, 1),
           "optimizer_mb": round(stats["optimizer_state_bytes_per_process"] / 1e6, 1)}
    Path(args.row_file).with_suffix(f".rank{dp.rank}.json").write_text(json.dumps(row))
    distributed.shutdown()


def run_configuration(args, nproc: int, shard: str, tmp: Path) -> list:
    row_file = tmp / f"n{nproc}_{shard}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker", "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--steps",
           str(args.steps), "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--row-file", str(row_file),
           "--shard", shard, "--optimizer", args.optimizer]
    subprocess.run(cmd, check=True, env={**os.environ, "PRUNEBENCH_NO_PROGRESS": "1"})
    return [json.loads(p.read_text()) for p in sorted(tmp.glob(row_file.stem + ".rank*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is not timed)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step, one per micro-batch")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw-8bit"))
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="none", choices=("none", "optimizer", "logits"), help=argparse.SUPPRESS)
    ap.add_argument("--row-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configurations = [(1, "none"), (args.nproc, "none"), (args.nproc, "optimizer"), (args.nproc, "logits")]
        for nproc, shard in configurations:
            if shard == "optimizer" and args.optimizer == "adamw-8bit":
                continue  # refused: ZeRO and torchao's tensor learning rate do not mix
            rows += run_configuration(args, nproc, shard, Path(tmp))
    print(f"LEAP on {args.model}, {args.device}, {args.dtype}, {args.optimizer}: {args.batch} x {args.seqlen} "
          f"tokens per step, {args.steps} steps")
    print(f"{'processes':>9} {'sharded':>9} {'rank':>4} {'peak GB':>8} {'step s':>7} {'logits MB':>9} {'optim MB':>8}")
    for r in rows:
        print(f"{r['processes']:>9} {r['shard']:>9} {r['rank']:>4} {r['peak_gb']:>8.3f} {r['median_step_s']!s:>7} "
              f"{r['logits_mb']:>9} {r['optimizer_mb']:>8}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
