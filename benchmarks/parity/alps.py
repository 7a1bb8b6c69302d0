"""Parity of prunebench's ALPS (methods/alps.py) with the authors' code on real layer inputs.

Takes one decoder block of a model (default: the embedded SmolLM2-135M), captures the raw inputs
of one or two of its linears over a few calibration windows, and prunes each linear three ways
on those same inputs:

  ours          prunebench.methods.alps.alps_prune with its defaults (the stated rho rule, the
                masked CG stopping test), from X^T X / n as the engine accumulates it;
  ours-authors  the same with authors_rho_rule=True and authors_cg_stop=True;
  authors       ALPS_prune.ALPS_admm from mazumder-lab/ALPS alps.py, fed the raw inputs through
                its own add_batch (it accumulates the unnormalised X^T X itself).

and, as a yardstick for how far rounding alone moves the support,

  ours-X^TX     ours from the unnormalised X^T X (n_tokens x the engine's H): the same problem in
                exact arithmetic (the ridge and the normalisation remove the scale), other roundings;

and prints, per linear and sparsity: mask agreement with ours and with the authors' mask
(fraction of equal entries; and the share of the authors' kept weights that a run keeps too),
the relative reconstruction error tr((W - W') H (W - W')^T) / tr(W H W^T) with the plain
H = X^T X of the captured inputs, the ADMM and CG iterations, the final rho, and the time.
Not part of the test suite.

Measured (CPU, 1 thread, defaults: SmolLM2-135M block 3, 16 x 256 Lee tokens): ours and the
authors' agree on 98.6 % (q_proj) and 97.3 % (down_proj) of the mask entries at 70 %, 99.9 % and
99.8 % at 2:4, no further apart than ours from ours-X^TX (98.8 %, 96.8 %, 99.8 %, 99.7 %): the
ADMM support is that sensitive to rounding.  Relative errors agree to 0.03 % (q_proj 70 %:
1.5212e-2 vs 1.5207e-2; down_proj 70 %: 5.8566e-2 vs 5.8556e-2), with the same 33 iterations,
final rho and 10 CG iterations.

The authors' file is never copied into this repository: point --reference-checkout at a folder
holding their alps.py, e.g.

    git --git-dir=<bare mirror of mazumder-lab/ALPS> archive HEAD alps.py | tar -x -C /tmp/alps-ref
    python benchmarks/parity/alps.py --reference-checkout /tmp/alps-ref

Their code hard-codes 'cuda:0'; without a GPU it runs on the CPU under a shim that maps that
device to 'cpu' for the duration of the call (and makes torch.cuda.synchronize a no-op).  Their
iteration counts (ADMM, CG) and final rho are read from ALPS_admm's locals when it returns.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import time
from pathlib import Path


def load_reference(checkout: str):
    source = Path(checkout).expanduser() / "alps.py"
    if not source.is_file():
        raise SystemExit(f"{source} not found: --reference-checkout must hold mazumder-lab/ALPS's alps.py")
    spec = importlib.util.spec_from_file_location("mazumder_alps", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def cuda_as(module, device: str):
    """Run the authors' code with 'cuda:0' meaning `device` (a no-op when that is CUDA)."""
    import torch

    if device.startswith("cuda"):
        yield
        return
    original_to, original_sync, original_dev = torch.Tensor.to, torch.cuda.synchronize, module.dev

    def to(self, *args, **kwargs):
        args = tuple(device if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = device
        return original_to(self, *args, **kwargs)

    torch.Tensor.to, torch.cuda.synchronize, module.dev = to, (lambda *a, **k: None), device
    try:
        yield
    finally:
        torch.Tensor.to, torch.cuda.synchronize, module.dev = original_to, original_sync, original_dev


@contextlib.contextmanager
def capture_locals(wanted: dict, into: dict):
    """Copy locals from functions when they return: wanted = {function name: (local names)}."""
    def local(frame, event, arg):
        if event == "return":
            into.update({n: frame.f_locals.get(n) for n in wanted[frame.f_code.co_name]})
        return local

    def tracer(frame, event, arg):
        return local if event == "call" and frame.f_code.co_name in wanted else None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(old)


def capture_inputs(args):
    """({linear name: module}, {linear name: [inputs per batch of 4 windows]}) of block `args.block`."""
    from block_inputs import block_at, record_inputs

    names = [n.strip() for n in args.linears.split(",") if n.strip()]
    block, linears, hidden, block_args, block_kwargs = block_at(args.model, args.block, names, args.n_samples,
                                                                args.seqlen, dataset=args.calibration,
                                                                windows_per_batch=4)
    return linears, record_inputs(block, linears, hidden, block_args, block_kwargs)


def relative_error(H, W, W_new) -> float:
    D = (W_new - W).double()
    return float(((D @ H.double()) * D).sum() / ((W.double() @ H.double()) * W.double()).sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-checkout", required=True, help="folder holding mazumder-lab/ALPS's alps.py")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--linears", default="self_attn.q_proj,mlp.down_proj")
    p.add_argument("--sparsities", default="0.7,2:4")
    p.add_argument("--calibration", default="lee")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from prunebench.engines.layerwise import StatsAccumulator
    from prunebench.methods.alps import alps_prune
    from prunebench.contract import STATS_HESSIAN
    from prunebench.sparsity.patterns import SparsitySpec

    torch.set_num_threads(args.threads)
    reference = load_reference(args.reference_checkout)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    modules, inputs = capture_inputs(args)
    print(f"{args.model} block {args.block}, {args.n_samples} x {args.seqlen} tokens of {args.calibration}, "
          f"device {device}, {torch.get_num_threads()} thread(s)")
    header = (f"{'linear':<18} {'sparsity':<8} {'run':<13} {'mask=ours':>9} {'mask=auth':>9} {'kept∩auth':>9} "
              f"{'rel.err':>10} {'iters':>5} {'rho':>8} {'cg':>3} {'seconds':>8}")
    print(header)
    print("-" * len(header))
    for name, module in modules.items():
        acc = StatsAccumulator(module.weight.shape[1], STATS_HESSIAN, "cpu")
        for x in inputs[name]:
            acc.add(x)
        stats = acc.result()
        H = stats.hessian * stats.n_tokens  # the plain X^T X, for the error
        W = module.weight.detach().float().clone()
        for text in [s.strip() for s in args.sparsities.split(",") if s.strip()]:
            spec = SparsitySpec.parse(text).resolved("layer")
            rows = {}
            for run, scale, options in (("ours", 1, {}), ("ours-X^TX", stats.n_tokens, {}),
                                        ("ours-authors", 1, {"authors_rho_rule": True, "authors_cg_stop": True})):
                t0 = time.perf_counter()
                new_w, mask, infos = alps_prune((stats.hessian * scale).to(device), W.to(device), spec, **options)
                seconds = time.perf_counter() - t0
                info = infos[0]
                rows[run] = (new_w.cpu(), mask.cpu(), info["iterations"], info["rho"], info["cg_iterations"], seconds)
            layer = copy.deepcopy(module).to(device)
            pruner = reference.ALPS_prune(layer, args.n_samples, args.seqlen)
            seen = {}
            with cuda_as(reference, device), torch.no_grad():
                for x in inputs[name]:
                    x = x.to(device)
                    pruner.add_batch(x, layer(x))
                nm_n, nm_m = (spec.n, spec.m) if spec.pattern == "nm" else (0, 0)
                t0 = time.perf_counter()
                with capture_locals({"ALPS_admm": ("i_admm", "rho"), "cg_batch": ("k",)}, seen):
                    pruner.ALPS_admm(spec.target, nm_n=nm_n, nm_m=nm_m)
                seconds = time.perf_counter() - t0
            theirs = layer.weight.detach().float().cpu()
            rows["authors"] = (theirs, theirs != 0, int(seen["i_admm"]) + 1, float(seen["rho"]), int(seen["k"]),
                               seconds)
            their_mask, our_mask = rows["authors"][1], rows["ours"][1]
            for run, (new_w, mask, iters, rho, cg, seconds) in rows.items():
                agree = float((mask == their_mask).float().mean())
                kept_too = float((mask & their_mask).sum()) / max(int(their_mask.sum()), 1)
                ours_too = float((mask == our_mask).float().mean())
                print(f"{name:<18} {text:<8} {run:<13} {ours_too:>9.4f} {agree:>9.4f} {kept_too:>9.4f} "
                      f"{relative_error(H, W, new_w):>10.4e} {iters:>5} {rho:>8.3g} {cg:>3} {seconds:>8.2f}")
            del pruner, layer
    return 0


if __name__ == "__main__":
    sys.exit(main())
