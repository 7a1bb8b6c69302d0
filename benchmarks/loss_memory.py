"""Peak memory of the training loss with and without `loss_chunk`, measured on this machine.

The loss alone, isolated from the rest of a training step: the decoder's last hidden states of
one sequence are computed once (no grad), then each variant runs the output head, the
cross-entropy and its backward to those hidden states, in its own subprocess so the high-water
marks (peak RSS; peak CUDA memory on a GPU) do not mix.  The full loss keeps the [tokens x vocab]
logits in the model dtype and in float32 with their gradient; the chunked loss one chunk's.

    python benchmarks/loss_memory.py                          # SmolLM2-135M (49k vocabulary), 4096 tokens
    python benchmarks/loss_memory.py --chunks 0,256,1024 --seqlen 2048
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

    from prunebench.engines import masklearn_loss
    from prunebench.modeling.output_head import OutputHead
    from prunebench.modeling.models import load_model

    loaded = load_model(args.model)
    model = loaded.model.to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    head = OutputHead.of(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seqlen), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    with torch.no_grad():
        hidden = head.decoder(input_ids=ids, use_cache=False).last_hidden_state
    hidden.requires_grad_(True)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if args.chunk:
        loss = masklearn_loss.chunked_lm_loss(hidden, ids, head, args.chunk)
    else:
        loss = masklearn_loss.lm_loss(head.logits(hidden), ids)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return {"chunk": args.chunk, "seconds": time.perf_counter() - t0, "loss": loss.item(),
            "grad_norm": float(hidden.grad.norm()), "rss_before_mb": rss_before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "vocab": model.config.vocab_size, "tokens": args.seqlen}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--chunks", default="0,512", help="comma-separated loss_chunk values (0: the full loss)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # internal: run one variant and print JSON
    args = p.parse_args()
    if args.chunk is not None:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        cmd = [sys.executable, __file__, "--chunk", str(chunk), "--model", args.model, "--seqlen", str(args.seqlen),
               "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["chunk"] == 0), rows[0])
    logits_mb = full["tokens"] * full["vocab"] * 4 / 2**20
    print(f"model {args.model}, {full['tokens']} tokens x {full['vocab']} vocabulary: one float32 copy of the "
          f"logits is {logits_mb:.0f} MB")
    print(f"{'loss_chunk':>10} {'seconds':>8} {'loss':>10} {'grad norm':>10} {'RSS before MB':>14} {'peak RSS MB':>12} "
          f"{'added MB':>9} {'peak CUDA MB':>13}")
    for r in rows:
        added = r["peak_rss_mb"] - r["rss_before_mb"]
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        print(f"{r['chunk']:>10} {r['seconds']:>8.2f} {r['loss']:>10.5f} {r['grad_norm']:>10.5f} {r['rss_before_mb']:>14.0f} "
              f"{r['peak_rss_mb']:>12.0f} {added:>9.0f} {cuda:>13}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
