"""Prune the same model with every layer-wise method on the same calibration windows.

Prints, per method: pruning seconds, the ratio to the measured floor and to Wanda's time in this
same run, peak RSS (each method runs in its own subprocess so the high-water marks do not mix),
and the per-block time breakdown.  Not part of the test suite.

The floor is what every sequential layer-wise method must do at least: capture the first
block's inputs, then run each block twice over the calibration tokens (once to gather
statistics, once to produce the next block's inputs), with no hooks and no arithmetic of its
own.  `floor` runs it with the engine's batching (prunebench.engines.layerwise.BLOCK_BATCH_WINDOWS
windows per forward); `floor-1` one window per forward, as the reference implementations loop.
`sparsegpt-reference` is SparseGPT organised as its reference implementation organises it
(re-written here for timing: one window per forward, a Hessian per linear, a full sort per
block), so prunebench's SparseGPT gets a ratio to it from the same run.  `sparsegpt-locuslab`
runs the authors' own code instead: the SparseGPT class of a local checkout of locuslab/wanda
(`--reference-checkout`, its lib/sparsegpt.py; not shipped here), driven as its prune_sparsegpt
drives it.

    python benchmarks/layerwise_methods.py --seqlen 256           # SmolLM2-135M, Lee, 32 x 256
    python benchmarks/layerwise_methods.py --methods floor,wanda,admm@2:4,sparsegpt+owl@0.7
    python benchmarks/layerwise_methods.py --methods floor-1,sparsegpt-reference,sparsegpt --seqlen 256
    python benchmarks/layerwise_methods.py --methods floor-1,sparsegpt-locuslab,sparsegpt --seqlen 256 \
        --reference-checkout ~/src/wanda
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
    """Run one entry and add the fraction of zeros it left in the decoder's prunable linears (the
    same count for every entry, so a driver that pruned the wrong thing shows)."""
    from prunebench.modeling.models import all_prunable, weight_matrix

    row, model = _run_entry(args)
    zeros = total = 0
    for module in all_prunable(model).values():
        w = weight_matrix(module)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    row["achieved_sparsity"] = zeros / max(total, 1)
    row["sparsity"] = args.sparsity if not args.method.startswith("floor") else "dense"
    return row


def _run_entry(args):
    import torch

    from prunebench import registry
    from prunebench.data.windows import WindowSpec, calibration_windows
    from prunebench.modeling.models import load_model
    from prunebench.contract import PruneContext
    from prunebench.engines.layerwise import LayerwisePruner
    from prunebench.sparsity.patterns import SparsitySpec

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    windows, fingerprint = calibration_windows(loaded.tokenizer, WindowSpec(args.calibration, args.n_samples, args.seqlen, 0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.method in ("floor", "floor-1"):
        return run_floor(args, loaded.model, windows, fingerprint, rss_before), loaded.model
    if args.method == "sparsegpt-reference":
        return run_reference_sparsegpt(args, loaded.model, windows, fingerprint, rss_before), loaded.model
    if args.method == "sparsegpt-locuslab":
        return run_locuslab_sparsegpt(args, loaded.model, windows, fingerprint, rss_before), loaded.model
    pruner = registry.create(args.method)
    assert isinstance(pruner, LayerwisePruner), f"{args.method} is not layer-wise"
    ctx = PruneContext(sparsity=SparsitySpec.parse(args.sparsity), calibration=windows, progress=False, registry=registry)
    t0 = time.perf_counter()
    report = pruner.prune(loaded.model, ctx)
    seconds = time.perf_counter() - t0
    return _row(args, seconds, report.stats.get("per_block_s"), report.stats.get("capture_s"), rss_before, fingerprint,
                len(report.warnings)), loaded.model


def _row(args, seconds, per_block, capture, rss_before, fingerprint, warnings=0) -> dict:
    """One entry's result: its time, per-block times and peak RSS (this process's high-water mark)."""
    return {"method": args.method, "seconds": seconds, "per_block_s": per_block, "capture_s": capture,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_prune_mb": rss_before,
            "fingerprint": fingerprint, "warnings": warnings}


def run_floor(args, model, windows, fingerprint, rss_before) -> dict:
    from prunebench.engines.layerwise import (
        BLOCK_BATCH_WINDOWS, batch_windows, capture_block_inputs, run_block
    )
    from prunebench.modeling.models import find_blocks

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
    return _row(args, time.perf_counter() - t0, per_block, capture, rss_before, fingerprint)


def run_reference_sparsegpt(args, model, windows, fingerprint, rss_before) -> dict:
    """SparseGPT organised as the reference implementation organises it (locuslab/wanda
    lib/prune.py and lib/sparsegpt.py), re-written here for timing only, so that prunebench's
    SparseGPT can be compared with it in one run on one machine: one calibration window per block
    forward; one Hessian per linear (q, k and v each their own), rescaled and added window by
    window with a full X^T X; each linear factorised and pruned on its own; the mask of each
    128-column block from a full sort of its saliencies; each column's error applied to the rest
    of its block at once; the per-column losses the reference also computes."""
    import math

    import torch

    from prunebench.engines.layerwise import capture_block_inputs, run_block
    from prunebench.modeling.models import find_blocks, prunable_linears, set_weight_matrix, weight_matrix

    sparsity, blocksize, percdamp = float(args.sparsity), 128, 0.01
    t0 = time.perf_counter()
    hidden, block_args, block_kwargs = capture_block_inputs(model, windows, "cpu")
    capture = time.perf_counter() - t0
    _, blocks = find_blocks(model)
    per_block = []
    for block in blocks:
        tb = time.perf_counter()
        linears = prunable_linears(block)
        hessians = {name: torch.zeros(weight_matrix(m).shape[1], weight_matrix(m).shape[1]) for name, m in linears.items()}
        seen = dict.fromkeys(linears, 0)

        def hook(name):
            def add_batch(module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).t().float()
                hessians[name] *= seen[name] / (seen[name] + x.shape[1])
                seen[name] += x.shape[1]
                x = math.sqrt(2 / seen[name]) * x
                hessians[name] += x @ x.t()
            return add_batch

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
        run_block(block, hidden, block_args, block_kwargs, "cpu")  # the statistics pass
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, module in linears.items():
                W = weight_matrix(module).detach().float().clone()
                H = hessians.pop(name)
                dead = torch.diagonal(H) == 0
                H[dead, dead] = 1
                W[:, dead] = 0
                H += percdamp * torch.mean(torch.diagonal(H)) * torch.eye(H.shape[0])
                Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
                losses = torch.zeros(W.shape[0])
                for i1 in range(0, W.shape[1], blocksize):
                    i2 = min(i1 + blocksize, W.shape[1])
                    W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
                    Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
                    saliency = W1 ** 2 / torch.diagonal(Hinv1).reshape(1, -1) ** 2
                    threshold = torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
                    pruned = saliency <= threshold
                    for i in range(i2 - i1):
                        w, d = W1[:, i], Hinv1[i, i]
                        q = w.clone()
                        q[pruned[:, i]] = 0
                        Q1[:, i] = q
                        Losses1[:, i] = (w - q) ** 2 / d ** 2
                        err = (w - q) / d
                        W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                        Err1[:, i] = err
                    W[:, i1:i2] = Q1
                    losses += torch.sum(Losses1, 1) / 2
                    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
                set_weight_matrix(module, W)
        hidden = run_block(block, hidden, block_args, block_kwargs, "cpu")  # the propagation pass
        per_block.append(round(time.perf_counter() - tb, 4))
    return _row(args, time.perf_counter() - t0, per_block, capture, rss_before, fingerprint)


def run_locuslab_sparsegpt(args, model, windows, fingerprint, rss_before) -> dict:
    """The authors' SparseGPT class (locuslab/wanda lib/sparsegpt.py, from `--reference-checkout`)
    driven as their lib/prune.py prune_sparsegpt drives it: a forward hook on every linear of the
    block calls add_batch, one calibration window per block forward, then fasterprune(sparsity,
    prune_n, prune_m, percdamp=0.01, blocksize=128) linear by linear, then the propagation pass.
    Its one CUDA call, torch.cuda.synchronize() after each linear, is a no-op without a GPU."""
    import importlib.util
    from pathlib import Path

    import torch

    from prunebench.engines.layerwise import capture_block_inputs, run_block
    from prunebench.modeling.models import find_blocks, prunable_linears

    if not args.reference_checkout:
        raise SystemExit("sparsegpt-locuslab needs --reference-checkout: a local clone of locuslab/wanda")
    source = Path(args.reference_checkout).expanduser() / "lib" / "sparsegpt.py"
    if not source.is_file():
        raise SystemExit(f"{source} not found: --reference-checkout must be a clone of locuslab/wanda")
    spec = importlib.util.spec_from_file_location("locuslab_sparsegpt", source)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    prune_n, prune_m = (int(x) for x in args.sparsity.split(":")) if ":" in args.sparsity else (0, 0)
    sparsity = prune_n / prune_m if prune_m else float(args.sparsity)

    t0 = time.perf_counter()
    hidden, block_args, block_kwargs = capture_block_inputs(model, windows, "cpu")
    capture = time.perf_counter() - t0
    _, blocks = find_blocks(model)
    per_block = []
    with torch.no_grad():
        for block in blocks:
            tb = time.perf_counter()
            linears = prunable_linears(block)
            gpts = {name: reference.SparseGPT(module) for name, module in linears.items()}

            def add_batch(name):
                def hook(_, inp, out):
                    gpts[name].add_batch(inp[0].data, out.data)
                return hook

            handles = [linears[name].register_forward_hook(add_batch(name)) for name in gpts]
            run_block(block, hidden, block_args, block_kwargs, "cpu")  # the statistics pass
            for h in handles:
                h.remove()
            for name in gpts:
                gpts[name].fasterprune(sparsity, prune_n=prune_n, prune_m=prune_m, percdamp=0.01, blocksize=128)
                gpts[name].free()
            hidden = run_block(block, hidden, block_args, block_kwargs, "cpu")  # the propagation pass
            per_block.append(round(time.perf_counter() - tb, 4))
    return _row(args, time.perf_counter() - t0, per_block, capture, rss_before, fingerprint)


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
    p.add_argument("--reference-checkout", default="",
                   help="a local clone of locuslab/wanda, for the sparsegpt-locuslab entry")
    p.add_argument("--out", default="", help="also write the rows, the commit and the CPU to this JSON file (atomically)")
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
               "--threads", str(args.threads), "--reference-checkout", args.reference_checkout]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{entry} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[-1]["entry"] = method if method.startswith("floor") else f"{method}@{sparsity or args.sparsity}"
        print(f"  {entry}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    floor = next((r["seconds"] for r in rows if r["method"] == "floor"), None)
    wanda = next((r["seconds"] for r in rows if r["method"] == "wanda"), None)
    floor_1 = next((r["seconds"] for r in rows if r["method"] == "floor-1"), None)
    # The SparseGPT references at each sparsity (the mean where an entry is repeated).
    def mean_seconds(method):
        by_sparsity = {}
        for r in rows:
            if r["method"] == method:
                by_sparsity.setdefault(r["sparsity"], []).append(r["seconds"])
        return {k: sum(v) / len(v) for k, v in by_sparsity.items()}
    rewrite, authors = mean_seconds("sparsegpt-reference"), mean_seconds("sparsegpt-locuslab")
    print(f"model {args.model}, calibration {args.calibration} {args.n_samples} x {args.seqlen} "
          f"(fingerprint {rows[0]['fingerprint']}), threads {args.threads or 'default'}")
    print(f"{'method':<28}{'prune s':>9}{'x floor':>9}{'x floor-1':>10}{'x wanda':>9}{'x sgpt-ref':>11}"
          f"{'x locuslab':>11}{'zeros':>8}{'peak RSS MB':>13}{'block s (min/median/max)':>27}")
    for r in rows:
        blocks = sorted(r["per_block_s"] or [0])
        ratio = lambda base: f"{r['seconds'] / base:.2f}" if base else "-"
        print(f"{r['entry']:<28}{r['seconds']:>9.1f}{ratio(floor):>9}{ratio(floor_1):>10}{ratio(wanda):>9}"
              f"{ratio(rewrite.get(r['sparsity'])):>11}{ratio(authors.get(r['sparsity'])):>11}"
              f"{r['achieved_sparsity']:>8.4f}{r['peak_rss_mb']:>13.0f}"
              f"{f'{blocks[0]:.2f} / {blocks[len(blocks) // 2]:.2f} / {blocks[-1]:.2f}':>27}")
    print(json.dumps(rows))
    if args.out:
        import platform

        import torch

        from prunebench.store.records import atomic_write_json
        from prunebench.run.runner import _cpu_model, _git_sha

        atomic_write_json(args.out, {"benchmark": "layerwise_methods", "command": sys.argv[1:], "commit": _git_sha(),
                                     "cpu": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                     "python": platform.python_version(), "rows": rows})


if __name__ == "__main__":
    main()
