"""Perplexity evaluation against a bare forward of the same windows, in one run.

The floor is the model's own forward over the windows (`model(input_ids).logits`, nothing
scored); prunebench's `perplexity` adds the next-token NLL, computed from the vocabulary head a
chunk of tokens at a time.  Rounds alternate the two so drift hits both; prints the medians and
the throughput of `perplexity` as a fraction of the bare forward's, and the peak RSS each adds.

    python benchmarks/eval_throughput.py                         # SmolLM2-135M and Gemma-3-270M
    python benchmarks/eval_throughput.py --models tiny:llama --windows 4 --seqlen 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench.data.windows import eval_tokens
from prunebench.evaluate.perplexity import eval_windows, perplexity
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

        def scored():
            perplexity(model, ids, args.seqlen, batch_size=args.batch_size, progress=False,
                       max_windows=args.windows, prefix=prefix)

        bare()  # warm-up: allocator, kernels
        times = {"bare forward": [], "perplexity": []}
        for _ in range(args.rounds):
            for name, fn in (("bare forward", bare), ("perplexity", scored)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        tokens = windows.numel()
        print(f"{spec}: {windows.shape[0]} windows x {args.seqlen} tokens, batch {args.batch_size}, "
              f"vocabulary {model.get_output_embeddings().out_features}, {torch.get_num_threads()} threads, "
              f"{args.rounds} alternating rounds (medians)")
        for name, t in med.items():
            print(f"  {name:13s} {t:7.2f} s  {tokens / t:8.1f} tokens/s  (rounds: "
                  + ", ".join(f"{x:.2f}" for x in times[name]) + ")")
        ratio = med["bare forward"] / med["perplexity"]
        print(f"  perplexity throughput = {ratio:.3f} x the bare forward's (goal >= {GOAL})")


if __name__ == "__main__":
    main()
