"""Where the bytes of a learned-mask training step go at paper scale: a plan on paper.

For each model of the LEAP paper (architectures from their published config.json files) and each
learned method, the memory of one GPU during training with the paper's settings (one sequence of
4096 tokens per micro-batch, activation checkpointing, bf16 weights), term by term:

    weights      frozen model, bf16
    logits       the mask parameters (LEAP: 1 per masked weight; MaskLLM: 6 per group of 4; PATCH
                 joint: MaskLLM's plus one per tile), in the logits dtype
    grads        one gradient per logit, same dtype
    optimizer    AdamW's two moments per logit
    masks        what the mask Function saves for backward: one soft mask per masked weight of the
                 block being recomputed (checkpointing keeps only one block's at a time)
    activations  the checkpointed block inputs (tokens x hidden x 2 bytes x layers) plus one
                 block's recomputed intermediates
    loss         the output logits over the vocabulary: bf16 out, fp32 for the cross-entropy and
                 its gradient (3 x tokens x vocab x 2 to 4 bytes), or one chunk of 512 tokens
                 with a chunked loss

and the options that change them: AdamW state in fp32 or bf16 or 8-bit, logits, grads and
optimizer state sharded over N GPUs (FSDP / ZeRO-3 shard them evenly; weights stay replicated
here), chunked loss.  Also the size of a resumable checkpoint (logits + optimizer state).

Arithmetic, not a measurement: no GPU was available when it was written (run it on one and
compare with torch.cuda.max_memory_allocated for the same settings).  The arithmetic lives in
prunebench/run/plan.py, which `prunebench run --dry-run` uses for a grid's plan.

    python benchmarks/learned_memory_plan.py
    python benchmarks/learned_memory_plan.py --methods leap --gpus 4 --state-dtype bf16
"""
from __future__ import annotations

import argparse

from prunebench.run.plan import DTYPE_BYTES, PAPER_ARCHS, logits_per_weight, training_memory

GB = 1e9
SEQLEN = 4096  # the authors' training sequence
LOSS_CHUNK = 512  # tokens per chunk of a chunked cross-entropy
BYTES = {k: DTYPE_BYTES[k] for k in ("fp32", "bf16", "8bit")}  # the AdamW state dtypes shown
ARCHS = tuple(PAPER_ARCHS.values())
# logits per masked weight (PATCH joint: MaskLLM's 2:4 plus one per 128 x 128 tile)
LOGITS_PER_WEIGHT = {m: logits_per_weight(m) for m in ("leap", "maskllm", "patch")}


def plan(arch, method: str, *, logits_dtype="bf16", state_dtype="bf16", gpus=1, chunked_loss=False) -> dict:
    """The library's arithmetic (prunebench.run.plan.training_memory) for one sequence per micro-batch,
    with checkpointing; over several GPUs logits, gradients and moments sharded evenly (FSDP)."""
    return training_memory(arch, LOGITS_PER_WEIGHT[method], micro_tokens=SEQLEN, logits_dtype=logits_dtype,
                           state_dtype=state_dtype, gpus=gpus, shard="logits",
                           loss_chunk=LOSS_CHUNK if chunked_loss else 0, checkpointing=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="leap,maskllm,patch")
    ap.add_argument("--gpus", type=int, default=0, help="show only this sharding (0: 1 and 4)")
    ap.add_argument("--state-dtype", default=None, choices=sorted(BYTES), help="show only this AdamW state dtype")
    args = ap.parse_args()
    options = []
    for state in ([args.state_dtype] if args.state_dtype else ["fp32", "bf16", "8bit"]):
        for gpus in ([args.gpus] if args.gpus else [1, 4]):
            for chunked in (False, True):
                options.append((state, gpus, chunked))
    keys = ("weights", "logits", "grads", "optimizer", "masks", "activations", "loss", "total", "checkpoint")
    print("GB per GPU, one 4096-token sequence per micro-batch, bf16 weights and logits, activation "
          "checkpointing (arithmetic, unmeasured)")
    for method in args.methods.split(","):
        print(f"\n{method}")
        print(f"{'model':14} {'masked':>7} {'AdamW':>5} {'GPUs':>4} {'chunk':>5} " + " ".join(f"{k:>11}" for k in keys)
              + "  fits 80 GB")
        for arch in ARCHS:
            for state, gpus, chunked in options:
                t = plan(arch, method, state_dtype=state, gpus=gpus, chunked_loss=chunked)
                print(f"{arch.name:14} {arch.masked / 1e9:6.2f}B {state:>5} {gpus:4d} {'yes' if chunked else 'no':>5} "
                      + " ".join(f"{t[k] / GB:11.2f}" for k in keys) + f"  {'yes' if t['total'] < 80 * GB else 'no'}")


if __name__ == "__main__":
    main()
