"""Time one LEAP training step against a plain dense forward+backward of the same batch.

Same model, same tokens.  The dense reference trains the prunable weights themselves (so its
backward computes the same weight-gradient matmuls LEAP needs for its logits); LEAP samples a
fresh binary-concrete mask per layer, computes with M * W, adds the two regularisers and
backpropagates into the logits.  Also prints the memory of the logits and of the AdamW state.

    OMP_NUM_THREADS=1 python benchmarks/leap_step.py                 # SmolLM2-135M (embedded)
    OMP_NUM_THREADS=1 python benchmarks/leap_step.py --model tiny:llama --seqlen 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench.models import all_prunable, load_model

import importlib

leap = importlib.import_module("prunebench.methods.leap")

RATIO_GOAL = 1.3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--logits-dtype", default="float32")
    ap.add_argument("--sparsity", type=float, default=0.6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model = loaded.model.eval()
    modules = all_prunable(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=gen)
    for p in model.parameters():
        p.requires_grad_(False)

    # Dense reference: forward + backward into the prunable weights.
    def dense_step():
        for m in modules.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        loss = leap._lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
        for m in modules.values():
            m.weight.grad = None
            m.weight.requires_grad_(False)

    # LEAP: logits around a random prior at the target, one sampled step.
    config = leap.Leap.Config(preset="embedded", logits_dtype=args.logits_dtype)
    dtype = leap.resolve_dtype(config.logits_dtype)
    params = {n: torch.nn.Parameter(leap.prior_logits(torch.rand(m.weight.shape, generator=gen) > args.sparsity,
                                                      config.init_std, config.prior_strength, gen, dtype))
              for n, m in modules.items()}
    optimizer = leap.make_adamw(list(params.values()), config)
    n_masked = sum(m.weight.numel() for m in modules.values())
    dense_norm = sum(float(m.weight.detach().norm()) for m in modules.values())
    patch = leap.MaskedLinears(modules, params, save_dtype=dtype)
    patch.alpha, patch.tau = config.alpha_start, config.tau_start

    def leap_step(step, with_optimizer):
        patch.mode, patch.step = "soft", step
        optimizer.zero_grad(set_to_none=True)
        ce = leap._lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        mask_sum = torch.stack([patch.mask_sums[n] for n in modules]).sum()
        loss = (ce + config.lambda_density * leap.density_penalty(mask_sum, n_masked, 1 - args.sparsity)
                - config.lambda_weight * leap.weight_ratio([patch.masked_sq[n].sqrt() for n in modules], dense_norm))
        loss.backward()
        if with_optimizer:
            optimizer.step()
        patch.mode = "off"

    def timed(fn):
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    # Interleave so both see the same machine load.
    patch.mode = "off"
    dense_s = timed(dense_step)
    leap_s = timed(lambda: leap_step(0, False))
    leap_opt_s = timed(lambda: leap_step(1, True))
    dense_s2 = timed(dense_step)
    dense_s = min(dense_s, dense_s2)
    patch.remove()

    logits_bytes = sum(p.numel() * p.element_size() for p in params.values())
    adam_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t))
    print(f"model {args.model}: {len(modules)} masked linears, {n_masked:,} masked weights; batch {args.batch} x "
          f"{args.seqlen} tokens; {torch.get_num_threads()} thread(s); logits {args.logits_dtype}")
    print(f"dense forward+backward        {dense_s:8.3f} s")
    print(f"LEAP step (fwd+bwd, sampling) {leap_s:8.3f} s   ratio {leap_s / dense_s:.2f}x (goal <= {RATIO_GOAL}x)")
    print(f"LEAP step + AdamW update      {leap_opt_s:8.3f} s   ratio {leap_opt_s / dense_s:.2f}x")
    print(f"logits memory                 {logits_bytes:,} bytes ({logits_bytes / 2**20:.1f} MiB)")
    print(f"AdamW state memory            {adam_bytes:,} bytes ({adam_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
