"""Sparse matmul kernels on this CPU against dense, for the embedded model's layer shapes.

For each of SmolLM2-135M's four linear shapes ([out, in]: q/o 576x576, k/v 192x576, gate/up
1536x576, down 576x1536), each mask (50% and 60% unstructured, 2:4; random positions, which is
what a kernel sees of a real mask's structure) and each batch (1 token: decoding; 128 tokens: a
prompt), times y = x W^T with

    dense      torch F.linear on the dense weight (the baseline)
    torch-csr  torch sparse CSR (W.to_sparse_csr(), MKL where torch was built with it)
    torch-bsr  torch sparse BSR, 16 x 16 blocks (only blocks with a kept weight are stored)
    scipy-csr  scipy.sparse CSR (its own C++ kernel)

in float32 (the CPU sparse kernels' dtype), with fixed threads, warm-ups and the median of
repeats (after 2 warm-ups), all in one run.  Speedups are dense time / path time; below 1 means slower than dense,
and is printed as it is.  2:4 has no CPU kernel here (torch's semi-structured sparsity needs
CUDA), so it runs through the general sparse paths.

    python benchmarks/sparse_kernels.py                  # 2 threads, 20 repeats
    python benchmarks/sparse_kernels.py --threads 1 --repeats 50
    python benchmarks/sparse_kernels.py --end-to-end     # and tokens/s of the whole model
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench.sparsity.patterns import nm_mask
from prunebench.measure.speed import KERNELS, kernel, median_seconds

SHAPES = {"q,o": (576, 576), "k,v": (192, 576), "gate,up": (1536, 576), "down": (576, 1536)}
MASKS = ("0.5", "0.6", "2:4")
BATCHES = (1, 128)


def random_mask(shape, spec: str, gen) -> torch.Tensor:
    scores = torch.rand(shape, generator=gen)
    if ":" in spec:
        n, m = (int(x) for x in spec.split(":"))
        return nm_mask(scores, n, m)
    return scores >= float(spec)  # keeps ~ (1 - s), positions at random


def paths(weight: torch.Tensor):
    """name -> callable(x [tokens, in]) -> y [tokens, out]; a kernel that cannot be built is left out."""
    return {name: fn for name in KERNELS if (fn := kernel(name, weight)) is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--end-to-end", action="store_true",
                    help="also decode with the embedded model at each mask: dense kernels vs the fastest kernel per linear")
    ap.add_argument("--tokens", type=int, default=32, help="tokens to decode per end-to-end timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, median of {args.repeats} "
          f"after 2 warm-ups; MKL: {torch.backends.mkl.is_available()}")
    header = f"{'shape':8} {'[out,in]':>10} {'mask':>4} {'batch':>5} {'dense us':>9}"
    names = None
    rows = []
    for label, shape in SHAPES.items():
        for spec in MASKS:
            weight = torch.randn(shape, generator=gen) * random_mask(shape, spec, gen)
            funcs = paths(weight)
            names = names or [n for n in funcs if n != "dense"]
            for batch in BATCHES:
                x = torch.randn(batch, shape[1], generator=gen)
                reference = funcs["dense"](x)
                times = {}
                for name, fn in funcs.items():
                    if not torch.allclose(fn(x), reference, atol=1e-3, rtol=1e-3):
                        raise SystemExit(f"{name} gives a different product for {label} {spec} batch {batch}")
                    times[name] = median_seconds(lambda: fn(x), args.repeats)
                rows.append((label, shape, spec, batch, times))
    print(header + "".join(f" {n + ' us':>12} {'x':>6}" for n in names))
    for label, shape, spec, batch, times in rows:
        dense = times["dense"]
        line = f"{label:8} {f'{shape[0]}x{shape[1]}':>10} {spec:>4} {batch:5d} {dense * 1e6:9.1f}"
        for n in names:
            t = times.get(n)
            line += f" {t * 1e6:12.1f} {dense / t:6.2f}" if t else f" {'-':>12} {'-':>6}"
        print(line)
    per_path = {}
    for _, _, spec, batch, times in rows:
        for n in names:
            if n in times:
                per_path.setdefault((spec, batch, n), []).append(times["dense"] / times[n])
    print("\nfastest sparse path per mask and batch (median speedup over the four shapes; < 1: slower than dense):")
    for spec in MASKS:
        for batch in BATCHES:
            options = {n: statistics.median(per_path[(spec, batch, n)]) for n in names if (spec, batch, n) in per_path}
            n = max(options, key=options.get)
            print(f"  mask {spec:>4} batch {batch:3d}: {n} {options[n]:.2f}x  ("
                  + ", ".join(f"{k} {v:.2f}x" for k, v in options.items()) + ")")
    if args.end_to_end:
        end_to_end(args)


def end_to_end(args) -> None:
    """Greedy decoding at batch 1 of SmolLM2-135M with random masks at 50%, 60% and 2:4: dense
    kernels vs each linear on its fastest kernel (prunebench.measure.speed.measure, what
    `prunebench cost --speed` records per cell)."""
    from prunebench.measure import speed
    from prunebench.modeling.models import all_prunable, load_model, weight_matrix

    model = load_model("smollm2-135m").model.eval()
    modules = all_prunable(model)
    dense = {n: weight_matrix(m).detach().clone() for n, m in modules.items()}
    print(f"\nend to end, SmolLM2-135M, greedy decode of {args.tokens} tokens at batch 1 (random masks):")
    for spec in MASKS:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, m in modules.items():
                weight_matrix(m).copy_(dense[name] * random_mask(tuple(dense[name].shape), spec, gen))
        r = speed.measure(model, tokens=args.tokens)
        print(f"  mask {spec:>4}: dense kernels {r['dense_tokens_per_s']:6.1f} tokens/s, fastest kernel per linear "
              f"{r['best_tokens_per_s']:6.1f} tokens/s ({r['speedup']:.2f}x; "
              + ", ".join(f"{k} x{v}" for k, v in r["kernels"].items()) + ")")


if __name__ == "__main__":
    main()
