"""Prune the same model with every layer-wise method on the same calibration windows.

Prints, per method: pruning seconds, the ratio to Wanda's time in this same run, peak RSS
(each method runs in its own subprocess so the high-water marks do not mix), and the per-block
time breakdown.  Not part of the test suite.

    python benchmarks/layerwise_methods.py                       # SmolLM2-135M, Lee, 32 x 512
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
    pruner = registry.create(args.method)
    assert isinstance(pruner, LayerwisePruner), f"{args.method} is not layer-wise"
    ctx = PruneContext(sparsity=SparsitySpec.parse(args.sparsity), calibration=windows, progress=False, registry=registry)
    t0 = time.perf_counter()
    report = pruner.prune(loaded.model, ctx)
    seconds = time.perf_counter() - t0
    return {"method": args.method, "seconds": seconds, "per_block_s": report.stats.get("per_block_s"),
            "capture_s": report.stats.get("capture_s"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_prune_mb": rss_before, "fingerprint": fingerprint, "warnings": len(report.warnings)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,admm")
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
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method, "--model", args.model, "--sparsity", args.sparsity,
               "--calibration", args.calibration, "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {method}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    wanda = next((r["seconds"] for r in rows if r["method"] == "wanda"), None)
    print(f"model {args.model}, sparsity {args.sparsity}, calibration {args.calibration} {args.n_samples} x {args.seqlen} "
          f"(fingerprint {rows[0]['fingerprint']})")
    print(f"{'method':<12}{'prune s':>10}{'x wanda':>10}{'peak RSS MB':>14}{'block s (min/median/max)':>28}")
    for r in rows:
        blocks = sorted(r["per_block_s"] or [0])
        ratio = f"{r['seconds'] / wanda:.2f}" if wanda else "-"
        print(f"{r['method']:<12}{r['seconds']:>10.1f}{ratio:>10}{r['peak_rss_mb']:>14.0f}"
              f"{f'{blocks[0]:.2f} / {blocks[len(blocks) // 2]:.2f} / {blocks[-1]:.2f}':>28}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
