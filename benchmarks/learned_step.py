"""Time one training step of each learned-mask method against a dense forward+backward.

Same model, same tokens, one run.  The dense reference trains the prunable weights themselves
(so its backward computes the same weight-gradient matmuls a mask needs); a learned step samples
the method's soft mask per layer through the shared engine (prunebench.masklearn), adds the
method's regularisers and backpropagates into the logits.  Logits start from a magnitude prior
(the prior does not change the step's cost and takes no calibration pass).  Prints each step
as a ratio to the dense step, with and without the AdamW update, and the logits' memory.

    python benchmarks/learned_step.py                                    # SmolLM2-135M, all three
    python benchmarks/learned_step.py --methods leap --model tiny:llama --seqlen 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench import masklearn, registry
from prunebench.models import all_prunable, load_model
from prunebench.registry import PruneContext, PruneReport
from prunebench.sparsity import SparsitySpec

# The target of the issue that asked for this benchmark (LEAP's step, as a ratio to dense).
RATIO_GOAL = 1.15
DEFAULT_SPECS = {"leap": "0.6", "maskllm": "2:4", "patch": "hybrid:0.35/64"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="leap,maskllm,patch")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--preset", default="embedded")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model = loaded.model.eval()
    modules = all_prunable(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=gen)
    for p in model.parameters():
        p.requires_grad_(False)

    def dense_step():
        for m in modules.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        masklearn.lm_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
        for m in modules.values():
            m.weight.grad = None
            m.weight.requires_grad_(False)

    def timed(fn):
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    torch.set_flush_denormal(True)  # as the engine does
    rows = []
    dense_times = [timed(dense_step)]
    for method in args.methods.split(","):
        spec = SparsitySpec.parse(DEFAULT_SPECS[method])
        pruner = registry.create(method, {"preset": args.preset, "prior_method": "magnitude"})
        ctx = PruneContext(sparsity=spec, progress=False, registry=registry, tokenizer=loaded.tokenizer)
        initial = pruner.init_logits(model, modules, ctx, PruneReport())
        frozen = pruner.frozen_keys()
        logits = {layer: {k: torch.nn.Parameter(t.float(), requires_grad=k not in frozen) for k, t in ps.items()}
                  for layer, ps in initial.items()}
        params = [p for ps in logits.values() for p in ps.values() if p.requires_grad]
        pruner.begin(modules, spec)
        optimizer = masklearn.make_adamw(params, pruner.config)
        patch = masklearn.MaskedLinears(modules, logits, pruner)

        def step(with_optimizer, step_index=[0]):
            patch.mode, patch.step = "soft", step_index[0]
            patch.sched = pruner.schedule(0)
            step_index[0] += 1
            optimizer.zero_grad(set_to_none=True)
            patch.stats.clear()
            loss = masklearn.lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            for term in pruner.regularisers(patch.stats, patch.sched)[0]:
                loss = loss + term
            loss.backward()
            if with_optimizer:
                optimizer.step()
            patch.mode = "off"

        plain = timed(lambda: step(False))
        with_opt = timed(lambda: step(True))
        patch.remove()
        dense_times.append(timed(dense_step))  # interleaved: each method next to a dense timing
        n_logits = sum(p.numel() for p in params)
        rows.append((method, spec.label, plain, with_opt, n_logits * 4, n_logits * 8))
        del optimizer, params, logits, initial, patch

    dense_s = statistics.median(dense_times)
    n_masked = sum(m.weight.numel() for m in modules.values())
    print(f"model {args.model}: {len(modules)} masked linears, {n_masked:,} masked weights; batch {args.batch} x "
          f"{args.seqlen} tokens; {torch.get_num_threads()} thread(s); preset {args.preset}; float32 logits")
    print(f"dense forward+backward: {dense_s:.3f} s (median of {len(dense_times)} interleaved timings: "
          + ", ".join(f"{t:.3f}" for t in dense_times) + ")")
    print(f"{'method':10} {'spec':16} {'step s':>8} {'ratio':>6} {'+AdamW s':>9} {'ratio':>6} {'logits MiB':>11} "
          f"{'Adam MiB':>9}")
    for method, label, plain, with_opt, logit_bytes, adam_bytes in rows:
        print(f"{method:10} {label:16} {plain:8.3f} {plain / dense_s:6.2f} {with_opt:9.3f} {with_opt / dense_s:6.2f} "
              f"{logit_bytes / 2**20:11.1f} {adam_bytes / 2**20:9.1f}")
    print(f"(goal for LEAP's step: <= {RATIO_GOAL}x the dense step)")


if __name__ == "__main__":
    main()
