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
compare with torch.cuda.max_memory_allocated for the same settings).

    python benchmarks/learned_memory_plan.py
    python benchmarks/learned_memory_plan.py --methods leap --gpus 4 --state-dtype bf16
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9
SEQLEN = 4096  # the authors' training sequence
LOSS_CHUNK = 512  # tokens per chunk of a chunked cross-entropy
# bytes per stored value; 8bit is `optimizer: adamw-8bit` (torchao's AdamW8bit): a 1-byte code
# per value and a float32 scale per block of 256 values, as tests/test_optimizers.py measures
BYTES = {"fp32": 4, "bf16": 2, "8bit": 1 + 4 / 256}


@dataclass(frozen=True)
class Arch:
    """A decoder's shape (from the model's config.json on the Hugging Face hub)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def masked_per_layer(self) -> int:
        q = o = self.hidden * self.heads * self.head_dim
        k = v = self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return q + k + v + o + mlp

    @property
    def masked(self) -> int:
        return self.layers * self.masked_per_layer

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.masked + embed * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden


ARCHS = (
    Arch("Qwen-2.5 0.5B", 896, 4864, 24, 14, 2, 64, 151936, True),
    Arch("Gemma-3 1B", 1152, 6912, 26, 4, 1, 256, 262144, True),
    Arch("LLaMA-3.2 1B", 2048, 8192, 16, 32, 8, 64, 128256, True),
    Arch("LLaMA-3.2 3B", 3072, 8192, 28, 24, 8, 128, 128256, True),
    Arch("Llama-3.1 8B", 4096, 14336, 32, 32, 8, 128, 128256, False),
)
# logits per masked weight (PATCH: plus one per 128 x 128 tile)
LOGITS_PER_WEIGHT = {"leap": 1.0, "maskllm": 6 / 4, "patch": 6 / 4 + 1 / 128 ** 2}


def plan(arch: Arch, method: str, *, logits_dtype="bf16", state_dtype="bf16", gpus=1, chunked_loss=False) -> dict:
    n_logits = arch.masked * LOGITS_PER_WEIGHT[method]
    lb = BYTES[logits_dtype]
    shard = 1.0 / gpus
    terms = {
        "weights": arch.params * 2,
        "logits": n_logits * lb * shard,
        "grads": n_logits * lb * shard,
        "optimizer": 2 * n_logits * BYTES[state_dtype] * shard,
        "masks": arch.masked_per_layer * LOGITS_PER_WEIGHT[method] * lb,
        "activations": SEQLEN * arch.hidden * 2 * arch.layers
        + SEQLEN * (8 * arch.hidden + 4 * arch.intermediate) * 2,
        "loss": (LOSS_CHUNK if chunked_loss else SEQLEN) * arch.vocab * (2 + 4 + 4),
    }
    terms["total"] = sum(terms.values())
    terms["checkpoint"] = n_logits * lb + 2 * n_logits * BYTES[state_dtype]
    return terms


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
