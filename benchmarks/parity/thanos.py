"""Parity of prunebench's Thanos (methods/thanos.py) with the authors' code, on real layer inputs.

Takes the Hessian X^T X / n of a few linears of SmolLM2-135M (embedded model, Lee calibration
windows, the dense model's own inputs to decoder block `--block`), prunes the same weights with
our pure functions and with the authors' Thanos class (lib/thanos.py of a checkout of
vectozavr/thanos, imported at run time; never shipped here), and prints mask agreement, the
largest weight difference, each one's relative reconstruction error tr(D H D^T) / tr(W H W^T)
(D = W - W_hat) and the time.  Not part of the test suite.

    git --git-dir=<mirror of vectozavr/thanos> archive e090a74 lib | tar -x -C /tmp/thanos-e090a74
    python benchmarks/parity/thanos.py --reference /tmp/thanos-e090a74                  # 0.5, 2:4
    python benchmarks/parity/thanos.py --reference /tmp/thanos-02cbfcd --selection block --specs 0.5

The authors' class gets our H (their 2/n scale does not change the result: the dampening is
relative to the mean diagonal), diag H as its input norms (`scaler_row`) and as its N:M row metric
(`X_squared_sum`); N:M runs theirs with perc_outliers=0.0 (their main.py) against ours with
outlier_rows=0.0, which reproduces it, and against our default (every row N:M).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
from pathlib import Path


def load_reference(checkout: Path):
    import torch

    source = checkout / "lib" / "thanos.py"
    if not source.is_file():
        raise SystemExit(f"{source} not found: --reference must hold lib/thanos.py of vectozavr/thanos")
    spec = importlib.util.spec_from_file_location("vectozavr_thanos", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # their one CUDA call, after each layer
    return module


def layer_hessians(model_spec, block_index, names, n_samples, seqlen):
    """{name: (weight [out, in] float32, H = X^T X / n)} for linears of one decoder block."""
    from prunebench.engines.layerwise import collect_block_stats
    from prunebench.modeling.models import weight_matrix
    from prunebench.contract import STATS_HESSIAN

    from block_inputs import block_at

    block, linears, hidden, args, kwargs = block_at(model_spec, block_index, names, n_samples, seqlen)
    groups, stats, _ = collect_block_stats(block, linears, STATS_HESSIAN, hidden, args, kwargs, "cpu")
    leader = {n: g[0] for g in groups for n in g}
    return {n: (weight_matrix(linears[n]).detach().float().clone(), stats[leader[n]].hessian) for n in names}


def ours(W, H, spec, selection, outlier_rows=None, blocksize=128, v_blocksize=64, percdamp=0.01):
    """methods/thanos.py's pure functions, as Thanos.prune_group composes them for one linear."""
    import torch

    from prunebench.methods.sparsegpt import damped_inverse_cholesky, prepare_hessian
    from prunebench.methods.thanos import outlier_rows as dense_rows, thanos_prune

    norm = torch.diagonal(H).clamp_min(0).sqrt()
    Hp, Wp, _ = prepare_hessian(H, W)
    V, _, _ = damped_inverse_cholesky(Hp, percdamp)
    if outlier_rows is None:
        return thanos_prune(Wp, V, norm, spec, blocksize, v_blocksize, selection)
    sel = ~dense_rows(Wp, norm.pow(2), outlier_rows)
    new_w, mask = Wp.clone(), torch.ones_like(Wp, dtype=torch.bool)
    new_w[sel], mask[sel] = thanos_prune(Wp[sel], V, norm, spec, blocksize, v_blocksize, selection)
    return new_w, mask


def theirs(reference, W, H, spec, blocksize=128, v_blocksize=64, percdamp=0.01):
    """The authors' Thanos.snap on our H and W (their stdout prints silenced)."""
    import contextlib
    import io

    import torch

    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    obj = reference.Thanos(layer)
    obj.H = H.clone()
    obj.nsamples = 1
    obj.scaler_row = torch.diagonal(H).clone()
    obj.X_squared_sum = torch.diagonal(H).clone().unsqueeze(1)  # their N:M row metric: W^2 @ this
    prune_n, prune_m = (spec.m - spec.n, spec.m) if spec.pattern == "nm" else (0, 0)
    kwargs = dict(prune_n=prune_n, prune_m=prune_m, blocksize=blocksize, percdamp=percdamp, v_blocksize=v_blocksize)
    if "perc_outliers" in inspect.signature(obj.snap).parameters:
        kwargs["perc_outliers"] = 0.0  # what their main.py passes
    with contextlib.redirect_stdout(io.StringIO()):
        obj.snap(spec.target, **kwargs)
    return layer.weight.data.float().clone()


def rel_error(W, W_hat, H) -> float:
    D = W - W_hat
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="a checkout of vectozavr/thanos (lib/thanos.py)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--block", type=int, default=3, help="decoder block whose linears are compared")
    parser.add_argument("--layers", default="self_attn.q_proj,mlp.down_proj")
    parser.add_argument("--specs", default="0.5,2:4", help="unstructured targets (scope layer) and N:M patterns")
    parser.add_argument("--selection", default="remaining", choices=("remaining", "block"),
                        help="ours: remaining = commit 68f8a18..e090a74, block = commit 02cbfcd")
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from prunebench.sparsity.patterns import SparsitySpec

    torch.set_num_threads(args.threads)
    reference = load_reference(args.reference)
    names = [n.strip() for n in args.layers.split(",") if n.strip()]
    data = layer_hessians(args.model, args.block, names, args.n_samples, args.seqlen)
    print(f"{args.model} block {args.block}, {args.n_samples} x {args.seqlen} Lee tokens; reference {args.reference}; "
          f"ours selection={args.selection}; blocksize 128, v_blocksize 64, percdamp 0.01")
    print(f"{'layer':<16} {'spec':<5} {'ours':<17} {'mask agree':>10} {'max |dW|':>9} {'rel. max':>9} "
          f"{'err ours':>9} {'err theirs':>10} {'t ours':>7} {'t theirs':>8}")
    for name in names:
        W, H = data[name]
        for text in args.specs.split(","):
            spec = SparsitySpec.parse(text.strip()).resolved("layer")
            t0 = time.perf_counter()
            ref_w = theirs(reference, W, H, spec)
            t_ref = time.perf_counter() - t0
            variants = [("default", None)] + ([("outlier_rows=0.0", 0.0)] if spec.pattern == "nm" else [])
            for label, outliers in variants:
                t0 = time.perf_counter()
                new_w, mask = ours(W, H, spec, args.selection, outliers)
                t_ours = time.perf_counter() - t0
                agree = float((mask == (ref_w != 0)).float().mean())
                diff = float((new_w - ref_w).abs().max())
                print(f"{name:<16} {spec.label:<5} {label:<17} {agree:>10.6f} {diff:>9.2e} "
                      f"{diff / float(W.abs().max()):>9.2e} {rel_error(W, new_w, H):>9.5f} "
                      f"{rel_error(W, ref_w, H):>10.5f} {t_ours:>7.2f} {t_ref:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
