"""Peak memory and step time of LEAP's training on one process vs several (torch.distributed).

Each configuration runs as its own torchrun world: N processes (one per GPU, or gloo processes
on a CPU) train LEAP for a few steps on the same model and report, per process, the peak memory
(torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU) and the median
optimizer-step time.  Configurations: 1 process; N processes; N processes with the AdamW
moments sharded (shard_optimizer_state, torch's ZeroRedundancyOptimizer).  One global batch for
all of them (grad_accum micro-batches of one sequence), so the step does the same work.

    python benchmarks/learned_parallel.py                                  # CPU, 2 gloo processes, SmolLM2-135M
    python benchmarks/learned_parallel.py --device cuda --nproc 4 --dtype bfloat16
    python benchmarks/learned_parallel.py --model tiny:llama --steps 3      # a quick smoke run

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

    from prunebench import distributed, registry
    from prunebench.data import WindowSpec, calibration_windows
    from prunebench.models import load_model
    from prunebench.registry import PruneContext
    from prunebench.sparsity import SparsitySpec

    distributed.init_from_environment(args.device)
    dp = distributed.DataParallel.current()
    loaded = load_model(args.model, dtype=args.dtype)
    loaded.model.to(args.device)
    calib, _ = calibration_windows(loaded.tokenizer, WindowSpec("lee", 16, args.seqlen, 0))
    config = {"preset": "embedded", "steps": args.steps, "batch_size": args.batch, "grad_accum": args.batch,
              "seqlen": args.seqlen, "heldout_windows": 0, "heldout_every": 0, "checkpoint_every": 0,
              "shard_optimizer_state": args.shard, "logits_dtype": "bfloat16" if args.dtype == "bfloat16" else "float32"}
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
    pruner.prune(loaded.model, ctx)
    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # the first interval runs from the scheduler's construction (the prior and set-up) to step 1
    steps = step_times[1:]
    row = {"rank": dp.rank, "processes": dp.world, "shard": args.shard, "peak_gb": round(peak / 1e9, 3),
           "median_step_s": round(statistics.median(steps), 3) if steps else None}
    Path(args.row_file).with_suffix(f".rank{dp.rank}.json").write_text(json.dumps(row))
    distributed.shutdown()


def run_configuration(args, nproc: int, shard: bool, tmp: Path) -> list:
    row_file = tmp / f"n{nproc}_s{int(shard)}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker", "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--steps",
           str(args.steps), "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--row-file", str(row_file)]
    if shard:
        cmd.append("--shard")
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
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--row-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc, shard in ((1, False), (args.nproc, False), (args.nproc, True)):
            rows += run_configuration(args, nproc, shard, Path(tmp))
    print(f"LEAP on {args.model}, {args.device}, {args.dtype}: {args.batch} x {args.seqlen} tokens per step, "
          f"{args.steps} steps")
    print(f"{'processes':>9} {'sharded':>7} {'rank':>4} {'peak GB':>8} {'step s':>7}")
    for r in rows:
        print(f"{r['processes']:>9} {str(r['shard']):>7} {r['rank']:>4} {r['peak_gb']:>8.3f} {r['median_step_s']!s:>7}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
