"""Perplexity evaluation against a bare forward of the same windows, in one run.

The floor is the model's own forward over the windows (`model(input_ids).logits`, nothing
scored); prunebench's `perplexity` adds the next-token NLL, computed from the vocabulary head one
cache-sized vocabulary block at a time; "perplexity + dense-relative" adds KL(dense || model) and
top-1 agreement against a top-k dense summary (here the model's own: the cost is the same for a
pruned one).  The summary itself is made once per run (two scans of the vocabulary: the top k,
then the exact tail mass); its time is printed on its own.  Rounds alternate the three so drift
hits all; prints the medians and each one's throughput as a fraction of the bare forward's.

    python benchmarks/eval_throughput.py                         # SmolLM2-135M and Gemma-3-270M
    python benchmarks/eval_throughput.py --models tiny:llama --windows 4 --seqlen 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench.data.windows import eval_tokens
from prunebench.evaluate.dense_relative import DEFAULT_K
from prunebench.evaluate.perplexity import eval_windows, perplexity, perplexity_and_summary
from prunebench.modeling.models import load_model
from prunebench.modeling.sequence_start import sequence_start_ids

GOAL = 0.95  # the throughput the evaluation must keep, as a fraction of the bare forward's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="dense ids kept per position")
    args = ap.parse_args()
    for spec in args.models.split(","):
        loaded = load_model(spec, dtype="float32")
        model = loaded.model.eval()
        prefix = sequence_start_ids(loaded.tokenizer)
        ids = eval_tokens(loaded.tokenizer, "lee", None)
        windows = eval_windows(ids, args.seqlen, args.windows, prefix)

        def bare():
            with torch.no_grad():
                for start in range(0, windows.shape[0], args.batch_size):
                    model(input_ids=windows[start:start + args.batch_size], use_cache=False).logits.sum()

        kw = dict(batch_size=args.batch_size, progress=False, max_windows=args.windows, prefix=prefix)

        def scored():
            perplexity(model, ids, args.seqlen, **kw)

        t0 = time.perf_counter()
        _, summary = perplexity_and_summary(model, ids, args.seqlen, k=args.k, **kw)
        summary_s = time.perf_counter() - t0

        def relative():
            perplexity(model, ids, args.seqlen, dense=summary, **kw)

        bare()  # warm-up: allocator, kernels
        runs = (("bare forward", bare), ("perplexity", scored), ("+ dense-relative", relative))
        times = {name: [] for name, _ in runs}
        for _ in range(args.rounds):
            for name, fn in runs:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        tokens = windows.numel()
        print(f"{spec}: {windows.shape[0]} windows x {args.seqlen} tokens, batch {args.batch_size}, "
              f"vocabulary {model.get_output_embeddings().out_features}, {torch.get_num_threads()} threads, "
              f"{args.rounds} alternating rounds (medians)")
        for name, t in med.items():
            print(f"  {name:16s} {t:7.2f} s  {tokens / t:8.1f} tokens/s  (rounds: "
                  + ", ".join(f"{x:.2f}" for x in times[name]) + ")")
        for name in ("perplexity", "+ dense-relative"):
            print(f"  {name} throughput = {med['bare forward'] / med[name]:.3f} x the bare forward's (goal >= {GOAL})")
        print(f"  dense summary (k={args.k}, once per run): {summary_s:.2f} s = "
              f"{summary_s / med['perplexity']:.2f} x one perplexity evaluation")


if __name__ == "__main__":
    main()
