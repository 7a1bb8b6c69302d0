"""Prune the same model with every layer-wise method on the same calibration windows.

Prints, per method: pruning seconds, the ratio to the measured floor and to Wanda's time in this
same run, peak RSS (each method runs in its own subprocess so the high-water marks do not mix),
and the per-block time breakdown.  Not part of the test suite.

The floor is what every sequential layer-wise method must do at least: capture the first
block's inputs, then run each block twice over the calibration tokens (once to gather
statistics, once to produce the next block's inputs), with no hooks and no arithmetic of its
own.  `floor` runs it with the engine's batching (prunebench.layerwise.BLOCK_BATCH_WINDOWS
windows per forward); `floor-1` one window per forward, as the reference implementations loop.

    python benchmarks/layerwise_methods.py --seqlen 256           # SmolLM2-135M, Lee, 32 x 256
    python benchmarks/layerwise_methods.py --methods floor,wanda,admm@2:4,sparsegpt+owl@0.7
    python benchmarks/layerwise_methods.py --model tiny:llama --n-samples 8 --seqlen 64
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(args) -> dict:
    import torch

    from prunebench import registry
    from prunebench.data import WindowSpec, calibration_windows
    from prunebench.models import load_model
    from prunebench.registry import LayerwisePruner, PruneContext
    from prunebench.sparsity import SparsitySpec

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    windows, fingerprint = calibration_windows(loaded.tokenizer, WindowSpec(args.calibration, args.n_samples, args.seqlen, 0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.method in ("floor", "floor-1"):
        return run_floor(args, loaded.model, windows, fingerprint, rss_before)
    pruner = registry.create(args.method)
    assert isinstance(pruner, LayerwisePruner), f"{args.method} is not layer-wise"
    ctx = PruneContext(sparsity=SparsitySpec.parse(args.sparsity), calibration=windows, progress=False, registry=registry)
    t0 = time.perf_counter()
    report = pruner.prune(loaded.model, ctx)
    seconds = time.perf_counter() - t0
    return {"method": args.method, "seconds": seconds, "per_block_s": report.stats.get("per_block_s"),
            "capture_s": report.stats.get("capture_s"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_prune_mb": rss_before, "fingerprint": fingerprint, "warnings": len(report.warnings)}


def run_floor(args, model, windows, fingerprint, rss_before) -> dict:
    from prunebench.layerwise import BLOCK_BATCH_WINDOWS, batch_windows, capture_block_inputs, run_block
    from prunebench.models import find_blocks

    t0 = time.perf_counter()
    hidden, block_args, block_kwargs = capture_block_inputs(model, windows, "cpu")
    capture = time.perf_counter() - t0
    hidden = batch_windows(hidden, BLOCK_BATCH_WINDOWS if args.method == "floor" else 1)
    _, blocks = find_blocks(model)
    per_block = []
    for block in blocks:
        tb = time.perf_counter()
        run_block(block, hidden, block_args, block_kwargs, "cpu")  # the statistics pass
        hidden = run_block(block, hidden, block_args, block_kwargs, "cpu")  # the propagation pass
        per_block.append(round(time.perf_counter() - tb, 4))
    return {"method": args.method, "seconds": time.perf_counter() - t0, "per_block_s": per_block, "capture_s": capture,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_prune_mb": rss_before,
            "fingerprint": fingerprint, "warnings": 0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="floor,floor-1,magnitude,wanda,sparsegpt,admm,admm@2:4",
                   help="comma-separated; NAME@SPARSITY overrides --sparsity for one entry")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--calibration", default="lee")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method and print JSON
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for entry in args.methods.split(","):
        method, _, sparsity = entry.partition("@")
        cmd = [sys.executable, __file__, "--method", method, "--model", args.model, "--sparsity", sparsity or args.sparsity,
               "--calibration", args.calibration, "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[-1]["entry"] = entry if "@" in entry else f"{method}@{args.sparsity}" if not method.startswith("floor") else method
        print(f"  {entry}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    floor = next((r["seconds"] for r in rows if r["method"] == "floor"), None)
    wanda = next((r["seconds"] for r in rows if r["method"] == "wanda"), None)
    print(f"model {args.model}, calibration {args.calibration} {args.n_samples} x {args.seqlen} "
          f"(fingerprint {rows[0]['fingerprint']}), threads {args.threads or 'default'}")
    print(f"{'method':<26}{'prune s':>10}{'x floor':>10}{'x wanda':>10}{'peak RSS MB':>14}{'block s (min/median/max)':>28}")
    for r in rows:
        blocks = sorted(r["per_block_s"] or [0])
        ratio = lambda base: f"{r['seconds'] / base:.2f}" if base else "-"
        print(f"{r['entry']:<26}{r['seconds']:>10.1f}{ratio(floor):>10}{ratio(wanda):>10}{r['peak_rss_mb']:>14.0f}"
              f"{f'{blocks[0]:.2f} / {blocks[len(blocks) // 2]:.2f} / {blocks[-1]:.2f}':>28}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
