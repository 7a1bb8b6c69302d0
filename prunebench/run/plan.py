"""A grid's plan on a named GPU: per cell the estimated peak GPU memory and GPU-hours, the tokens it
reads and the access it needs; the grid's totals.  Printed by `prunebench run --dry-run`.

Everything here is arithmetic, stated as estimates:

- memory: the terms of one GPU's memory while a cell trains (learned methods: frozen weights,
  mask logits, their gradients and AdamW moments, the soft masks saved for backward, the
  activations, the loss), prunes (one-shot: weights, captured calibration inputs, Hessians) or
  evaluates (weights and the perplexity batch's logits over the vocabulary), with the engine's
  own settings (logits dtype, checkpointing, loss chunking, 8-bit moments, sharding over the
  cell's processes); the cell's peak is the largest of its phases.
- time: FLOPs from parameters and tokens (a forward pass costs 2 x the matmul parameters per
  token plus causal attention; forward+backward 3 forward passes, one more with activation
  checkpointing), scaled by the step and pruning costs measured on CPU by this repository's
  benchmarks (each a ratio to its dense counterpart), over the GPU's dense bf16 peak times an
  assumed utilisation (--plan-utilisation; 40% by default, an assumption, not a measurement).
- tokens: calibration windows, training windows (and held-out windows), evaluation text and
  zero-shot requests (the last two from documented sizes: estimates).

A model's shape comes from a table of the paper models (their published config.json), the
embedded model, a tiny model's config, or a config already on this machine; nothing is
downloaded.  benchmarks/learned_memory_plan.py prints the memory terms at paper scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from prunebench.errors import UserError
from prunebench.modeling.models import tiny_config
from prunebench import registry
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.evaluate.perplexity import score_chunk_tokens
from prunebench.contract import STATS_HESSIAN
from prunebench.evaluate.zeroshot import EMBEDDED_TASKS, resolve_tasks
from prunebench.data.stream import STREAM_SOURCES
from prunebench.modeling.models import _cached_hub_commit
from prunebench.run.hub_models import GATED_PREFIXES, is_hub_model, snapshot_complete

GB = 1e9


# ---------------------------------------------------------------------------------------------
# GPUs

@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense bf16 Tensor Core peak (no 2:4 sparsity)
    memory_gb: float  # as sold; compared in units of 1e9 bytes, which leaves some 7% of the GiB the
    # card holds for the CUDA context and allocator slack


# Source: NVIDIA's data sheets (A100, H100, H200, L40S, RTX A6000, L4): the BF16 Tensor Core
# figure without sparsity (half the "with sparsity" figure they print first) and the memory.
GPU_SOURCE = "NVIDIA data sheets: dense BF16 Tensor Core peak (half the with-sparsity figure), memory as sold"
GPUS = {g.name.lower(): g for g in (
    GPU("A100-40GB", 312, 40), GPU("A100-80GB", 312, 80),
    GPU("H100-80GB", 989, 80),  # SXM5
    GPU("H100-PCIe", 756, 80),
    GPU("H200", 989, 141),  # SXM
    GPU("L40S", 362, 48), GPU("A6000", 155, 48), GPU("L4", 121, 24),
)}
DEFAULT_GPU = "H100-80GB"
DEFAULT_UTILISATION = 0.4  # an assumption: a fraction of the dense peak a well-fed bf16 step reaches


def gpu(name: str) -> GPU:
    found = GPUS.get(str(name).strip().lower())
    if found is None:
        raise UserError(f"no plan for GPU {name!r}: its peak and memory are not in prunebench's table",
                        hint=f"use one of {', '.join(g.name for g in GPUS.values())}")
    return found


def check_utilisation(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise UserError(f"the plan's utilisation must be a fraction in (0, 1], got {value!r}", hint="e.g. 0.4")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Model shapes

@dataclass(frozen=True)
class Arch:
    """A decoder's shape (from the model's config.json)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    mlp_matrices: int = 3  # gated MLPs (gate, up, down); 2 for OPT / GPT-2

    @property
    def masked_per_layer(self) -> int:
        q = o = self.hidden * self.heads * self.head_dim
        k = v = self.hidden * self.kv_heads * self.head_dim
        return q + k + v + o + self.mlp_matrices * self.hidden * self.intermediate

    @property
    def masked(self) -> int:
        return self.layers * self.masked_per_layer

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.masked + embed * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden

    def forward_flops(self, seqlen: int) -> float:
        """FLOPs of one forward pass per token: the linears and the output head (2 per weight),
        plus causal attention over a window of seqlen (QK and AV, the causal half)."""
        return 2.0 * (self.masked + self.vocab * self.hidden) + 2.0 * self.layers * self.heads * self.head_dim * seqlen


# The paper models (config.json on the Hugging Face hub) and the embedded SmolLM2-135M.
PAPER_ARCHS = {
    "Qwen/Qwen2.5-0.5B": Arch("Qwen-2.5 0.5B", 896, 4864, 24, 14, 2, 64, 151936, True),
    "google/gemma-3-1b-pt": Arch("Gemma-3 1B", 1152, 6912, 26, 4, 1, 256, 262144, True),
    "meta-llama/Llama-3.2-1B": Arch("LLaMA-3.2 1B", 2048, 8192, 16, 32, 8, 64, 128256, True),
    "meta-llama/Llama-3.2-3B": Arch("LLaMA-3.2 3B", 3072, 8192, 28, 24, 8, 128, 128256, True),
    "meta-llama/Llama-3.1-8B": Arch("Llama-3.1 8B", 4096, 14336, 32, 32, 8, 128, 128256, False),
}
# The embedded models, by spec (their GGUF's metadata; gemma-3-270m's config.json).
EMBEDDED_ARCHS = {
    "smollm2-135m": Arch("SmolLM2-135M", 576, 1536, 30, 9, 3, 64, 49152, True),
    "gemma3-270m": Arch("Gemma-3 270M", 640, 2048, 18, 4, 1, 256, 262144, True),
}


def arch_from_config(name: str, config) -> Arch | None:
    """The shape of a transformers config (Llama-like, OPT or GPT-2 names); None if it lacks one."""
    def first(*names, default=None):
        for n in names:
            value = getattr(config, n, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer")
    heads = first("num_attention_heads", "n_head")
    vocab = first("vocab_size")
    if None in (hidden, layers, heads, vocab):
        return None
    gated = getattr(config, "model_type", "") not in ("opt", "gpt2")
    return Arch(name, hidden, first("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden), layers, heads,
                first("num_key_value_heads", default=heads), first("head_dim", default=hidden // heads), vocab,
                bool(getattr(config, "tie_word_embeddings", True)), 3 if gated else 2)


def arch_for(spec: str) -> Arch | None:
    """A model's shape without its weights and without the network; None when unknown here."""
    from pathlib import Path


    if spec in PAPER_ARCHS:
        return PAPER_ARCHS[spec]
    if spec in EMBEDDED_ARCHS:
        return EMBEDDED_ARCHS[spec]
    if spec.endswith(".gguf"):
        return None
    try:
        if spec.startswith("tiny:"):
            config = tiny_config(spec.split(":", 1)[1], vocab_size=257)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(spec, local_files_only=True)  # a folder or the hub cache
    except UserError:
        raise
    except Exception:
        return None
    config = getattr(config, "text_config", None) or config
    return arch_from_config(Path(spec).name if not spec.startswith("tiny:") else spec, config)


# ---------------------------------------------------------------------------------------------
# Memory of a learned method's training step

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               # `optimizer: adamw-8bit` (torchao's AdamW8bit): a 1-byte code per value and a float32
               # scale per block of 256 values, as tests/engines/test_optimizers.py measures
               "8bit": 1 + 4 / 256}
LOSS_BYTES_PER_LOGIT = 2 + 4 + 4  # the bf16 output, its float32 copy and the cross-entropy's gradient
# perplexity (evaluate/perplexity.py) scores a chunk of tokens at a time from the last hidden
# states: the chunk's float32 logits, the cross-entropy's log-softmax and its exp
EVAL_BYTES_PER_LOGIT = 4 + 4 + 4


def logits_per_weight(method: str, sparsity=None, config: dict | None = None) -> float:
    """Mask parameters per masked weight of a learned method at `sparsity` (default: its first
    pattern: unstructured 50%, or 2:4), as the method itself counts them."""
    pruner = registry.create(method, config or {})
    if sparsity is None:
        sparsity = SparsitySpec.parse("0.5" if "unstructured" in pruner.capabilities.patterns else "2:4")
    return pruner.logits_per_weight(sparsity)


def training_memory(arch: Arch, per_weight: float, *, micro_tokens: int, logits_dtype="bf16", state_dtype=None,
                    weight_dtype="bf16", gpus: int = 1, shard: str = "none", loss_chunk: int = 0,
                    checkpointing: bool = True) -> dict:
    """Bytes per GPU of one training micro-batch of `micro_tokens` tokens, term by term.

    shard: "none" (every process holds all logits, gradients and moments, DDP), "optimizer" (the
    moments split over the gpus, ZeRO) or "logits" (logits, gradients and moments split, FSDP).
    state_dtype: the AdamW moments' dtype (default: the logits', as the engine keeps them)."""
    n_logits = arch.masked * per_weight
    lb = DTYPE_BYTES[logits_dtype]
    sb = DTYPE_BYTES[state_dtype or logits_dtype]
    split_logits = 1.0 / gpus if shard == "logits" else 1.0
    split_state = 1.0 / gpus if shard in ("logits", "optimizer") else 1.0
    block = micro_tokens * (8 * arch.hidden + 4 * arch.intermediate) * 2  # one block's recomputed intermediates
    terms = {
        "weights": arch.params * DTYPE_BYTES[weight_dtype],
        "logits": n_logits * lb * split_logits,
        "grads": n_logits * lb * split_logits,
        "optimizer": 2 * n_logits * sb * split_state,
        # what the mask Function saves for backward: one block's with checkpointing, every block's without
        "masks": arch.masked_per_layer * per_weight * lb * (1 if checkpointing else arch.layers),
        "activations": (micro_tokens * arch.hidden * 2 * arch.layers + block) if checkpointing else block * arch.layers,
        "loss": (min(loss_chunk, micro_tokens) if loss_chunk else micro_tokens) * arch.vocab * LOSS_BYTES_PER_LOGIT,
    }
    terms["total"] = sum(terms.values())
    terms["checkpoint"] = n_logits * lb + 2 * n_logits * sb  # a resumable state: logits + moments
    return terms


def eval_memory(arch: Arch, *, batch: int, seqlen: int, weight_dtype="bf16") -> float:
    """Bytes while perplexity is scored: the weights, one chunk's logits over the vocabulary in
    float32 three times over (EVAL_BYTES_PER_LOGIT; perplexity.score_chunk_tokens), the batch's
    last hidden states, one block's activations."""
    tokens = batch * seqlen
    chunk = min(tokens, score_chunk_tokens(arch.vocab))
    return (arch.params * DTYPE_BYTES[weight_dtype] + chunk * arch.vocab * EVAL_BYTES_PER_LOGIT
            + tokens * arch.hidden * DTYPE_BYTES[weight_dtype]
            + tokens * (8 * arch.hidden + 4 * arch.intermediate) * 2)


def prune_memory(arch: Arch, pruner, *, calib_tokens: int, weight_dtype="bf16") -> float:
    """Bytes while a one-shot method prunes: the weights, a block's calibration inputs and outputs
    (float32), and for a method on Hessian statistics (SparseGPT, ADMM, ...) the float32 Hessians
    of a block (q/k/v and gate/up share one, down_proj its own) with their inverse factors."""
    total = arch.params * DTYPE_BYTES[weight_dtype] + 2 * calib_tokens * arch.hidden * 4
    if pruner.capabilities.statistics == STATS_HESSIAN:
        total += 2 * 4 * (2 * arch.hidden ** 2 + arch.intermediate ** 2)
    return total


# ---------------------------------------------------------------------------------------------
# Step costs measured here (CPU), as ratios to their dense counterparts: each method declares its
# own (Pruner.cost_ratio, with where it was measured).  A method that has none is planned at the
# most expensive measured one of its kind, and the plan says so.

def measured_cost_ratio(pruner) -> tuple[float, str | None]:
    """(ratio, note): the method's own measured ratio, or the largest measured one of its kind."""
    own = type(pruner).cost_ratio
    if own is not None:
        return own, None
    kind = getattr(pruner, "kind", "other")
    measured = {name: registry.get(name).cost_ratio for name in registry.available()
                if getattr(registry.get(name), "kind", "other") == kind and registry.get(name).cost_ratio is not None}
    if not measured:
        return 1.0, f"{pruner.name}'s cost is unmeasured and no {kind} method's is: taken as 1x"
    name = max(measured, key=measured.get)
    what = "step" if kind == "learned" else "pruning"
    return measured[name], f"{pruner.name}'s {what} cost is unmeasured: taken as {name}'s {measured[name]}x"

# Evaluation sizes (estimates): perplexity text in tokens, and zero-shot requests per task as
# (items, choices, tokens per request).  WikiText-2 test: 245,569 words and lines, ~1.3 tokens
# each; C4: the first 1100 validation documents (data.eval_text), ~470 tokens each.
PPL_TOKENS = {"wikitext2": 320_000, "c4": 520_000}
ZEROSHOT_REQUESTS = {"mmlu": (14042, 4, 130), "piqa": (1838, 2, 60), "arc_easy": (2376, 4, 45),
                     "arc_challenge": (1172, 4, 50), "winogrande": (1267, 2, 30), "openbookqa": (500, 4, 30),
                     "boolq": (3270, 2, 150), "rte": (277, 2, 80), "hellaswag": (10042, 4, 100)}
ZEROSHOT_SEQLEN = 256  # requests are short: attention hardly counts


# ---------------------------------------------------------------------------------------------
# Per cell

@dataclass
class CellPlan:
    label: str
    model: str
    method: str
    kind: str  # learned | one-shot | dense
    gpus: int
    arch: Arch | None
    peak_bytes: float | None = None  # per GPU
    peak_phase: str = ""
    flops: float | None = None
    gpu_hours: float | None = None
    tokens: dict = field(default_factory=dict)  # calibration / training / evaluation
    access: list = field(default_factory=list)  # what must be reachable or granted
    notes: list = field(default_factory=list)

    @property
    def tokens_total(self) -> int:
        return int(sum(self.tokens.values()))

    def fits(self, card: GPU) -> bool | None:
        return None if self.peak_bytes is None else self.peak_bytes <= card.memory_gb * GB


def _eval_tokens(ev) -> tuple[int, int, list]:
    """(perplexity tokens, zero-shot request tokens, what has no size here)."""
    unknown = []
    ppl = 0
    for ds in ev.perplexity:
        n = PPL_TOKENS.get(ds)
        if ev.max_ppl_windows:
            n = min(n, ev.max_ppl_windows * ev.seqlen) if n is not None else ev.max_ppl_windows * ev.seqlen
        if n is None:
            unknown.append(ds)
        else:
            ppl += n
    zs = 0
    if ev.tasks:
        for task in resolve_tasks(ev.tasks, data_dir=None):
            if task not in ZEROSHOT_REQUESTS:
                unknown.append(task)
                continue
            items, choices, per = ZEROSHOT_REQUESTS[task]
            if ev.limit:
                items = min(items, int(ev.limit) if ev.limit >= 1 else math.ceil(items * ev.limit))
            zs += items * choices * per
    return ppl, zs, unknown


def _access(grid, cell, learned_config) -> list:
    """What the cell must reach or be granted: the model (gated: a token), hub texts, the stream."""
    out = []
    if is_hub_model(cell.model):
        out.append(f"token+licence {cell.model}" if cell.model.startswith(GATED_PREFIXES) else f"hub {cell.model}")
    local = grid.data_dir is not None

    if registry.create(cell.method, cell.method_config).capabilities.needs_calibration and \
            cell.calibration.dataset in ("c4", "wikitext2", "redpajama") and not local:
        out.append(f"hub {cell.calibration.dataset}")
    out += [f"hub {ds}" for ds in cell.eval.perplexity if ds in ("c4", "wikitext2", "redpajama") and not local]
    if learned_config is not None and getattr(learned_config, "streaming", False):
        ds = learned_config.dataset
        if ds in STREAM_SOURCES and not local:
            out.append(f"hub stream {STREAM_SOURCES[ds]['hub_id']}")
    if cell.eval.tasks and not local:
        hub_tasks = [t for t in resolve_tasks(cell.eval.tasks, data_dir=None) if t not in EMBEDDED_TASKS]
        if hub_tasks:
            out.append(f"hub lm-eval tasks ({len(hub_tasks)})")
    return list(dict.fromkeys(out))


def plan_cell(grid, cell, card: GPU, utilisation: float, nproc: int = 1) -> CellPlan:
    pruner = registry.create(cell.method, cell.method_config)
    kind = getattr(pruner, "kind", "other")
    learned = kind == "learned" and hasattr(pruner.config, "steps")
    plan = CellPlan(cell.label, cell.model, cell.method, "learned" if learned else ("dense" if kind == "dense" else
                    "one-shot"), nproc if learned else 1, arch_for(cell.model))
    config = pruner.config if learned else None
    plan.access = _access(grid, cell, config)
    cs, ev = cell.calibration, cell.eval
    if pruner.capabilities.needs_calibration:
        plan.tokens["calibration"] = cs.n_samples * cs.seqlen
    if learned:
        c = config
        plan.tokens["training"] = (c.steps * c.batch_size + c.heldout_windows) * c.seqlen
    ppl, zs, unknown = _eval_tokens(ev)
    plan.tokens["evaluation"] = ppl + zs
    if unknown:
        plan.notes.append(f"no size known for {', '.join(unknown)} (left out)")
    arch = plan.arch
    if arch is None:
        plan.notes.append("model shape unknown offline (no config here): no memory or time estimate")
        return plan
    wdtype = "bf16" if str(cell.dtype) in ("bfloat16", "bf16", "float16", "fp16") else "fp32"

    flops = ppl * arch.forward_flops(ev.seqlen) + zs * arch.forward_flops(ZEROSHOT_SEQLEN)
    phases = {"evaluation": eval_memory(arch, batch=ev.batch_size, seqlen=ev.seqlen, weight_dtype=wdtype)}
    calib = plan.tokens.get("calibration", 0)
    if learned:
        c = config
        ratio, note = measured_cost_ratio(pruner)
        if note:
            plan.notes.append(note)
        passes = 3 + (1 if c.gradient_checkpointing else 0)
        train_tokens = c.steps * c.batch_size * c.seqlen
        heldout_evals = (c.steps // c.heldout_every + 1) if c.heldout_every else 2
        flops += ratio * passes * train_tokens * arch.forward_flops(c.seqlen)
        flops += heldout_evals * c.heldout_windows * c.seqlen * arch.forward_flops(c.seqlen)
        prior = getattr(c, "prior_method", None)
        if prior:
            flops += measured_cost_ratio(registry.create(prior))[0] * 2 * calib * arch.forward_flops(cs.seqlen)
        shard = "logits" if c.shard_logits else ("optimizer" if c.shard_optimizer_state else "none")
        state = "8bit" if c.optimizer == "adamw-8bit" else None
        micro = (c.batch_size // c.grad_accum) * c.seqlen
        phases["training"] = training_memory(
            arch, pruner.logits_per_weight(cell.sparsity), micro_tokens=micro,
            logits_dtype=c.logits_dtype, state_dtype=state, weight_dtype=wdtype, gpus=nproc, shard=shard,
            loss_chunk=c.loss_chunk, checkpointing=c.gradient_checkpointing)["total"]
    elif plan.kind == "one-shot":
        ratio, note = measured_cost_ratio(pruner)
        if note:
            plan.notes.append(note)
        if "+" in cell.method:  # a per-block allocation from statistics: one more calibration pass
            ratio += 0.5
        flops += ratio * 2 * calib * arch.forward_flops(cs.seqlen)
        phases["pruning"] = prune_memory(arch, pruner, calib_tokens=calib, weight_dtype=wdtype)
    plan.peak_phase, plan.peak_bytes = max(phases.items(), key=lambda kv: kv[1])
    plan.flops = flops
    plan.gpu_hours = flops / (card.bf16_tflops * 1e12 * utilisation) / 3600
    return plan


# ---------------------------------------------------------------------------------------------
# A grid

# The LEAP authors' reported cost per LEAP cell (LEAP.md section 1: 2000 steps x 256 x 4096
# tokens on 4 GPUs, "22-276 GPU-hours depending on model size"; GPU type not stated there).
LEAP_REPORTED_GPU_HOURS = (22, 276)


@dataclass
class Plan:
    card: GPU
    utilisation: float
    nproc: int
    cells: list

    def totals(self) -> dict:
        known = [c for c in self.cells if c.gpu_hours is not None]
        peaks = [c for c in self.cells if c.peak_bytes is not None]
        top = max(peaks, key=lambda c: c.peak_bytes) if peaks else None
        return {"cells": len(self.cells), "estimated": len(known),
                "gpu_hours": sum(c.gpu_hours for c in known),
                "tokens": sum(c.tokens_total for c in self.cells),
                "peak_gb": top.peak_bytes / GB if top else None, "peak_cell": top.label if top else None,
                "over_memory": [c.label for c in peaks if not c.fits(self.card)],
                "access": sorted({a for c in self.cells for a in c.access})}

    def lines(self) -> list[str]:
        card = self.card
        out = [f"plan on {card.name} ({card.bf16_tflops:g} dense bf16 TFLOPS, {card.memory_gb:g} GB; {GPU_SOURCE}); "
               f"estimates: FLOPs from parameters and tokens x the step costs measured on CPU here, at "
               f"{self.utilisation:.0%} of peak (an assumption: --plan-utilisation), without loading, downloads and "
               f"lm-eval's per-request overhead; learned cells on {self.nproc} GPU(s) (--nproc-per-node)",
               f"  {'GPUs':>4} {'peak GB':>8} {'phase':>10} {'GPU-h':>8} {'tokens':>9}  cell  [access]"]
        for c in self.cells:
            peak = f"{c.peak_bytes / GB:8.1f}" if c.peak_bytes is not None else f"{'?':>8}"
            over = "!" if c.fits(card) is False else " "
            hours = f"{c.gpu_hours:8.2f}" if c.gpu_hours is not None else f"{'?':>8}"
            note = f"  ({'; '.join(c.notes)})" if c.notes else ""
            out.append(f"  {c.gpus:4d} {peak}{over}{c.peak_phase or '-':>10} {hours} {_tokens(c.tokens_total):>9}  "
                       f"{c.label}  [{', '.join(c.access) or 'local'}]{note}")
        t = self.totals()
        out.append(f"plan total: {t['cells']} cells, {t['gpu_hours']:.1f} GPU-hours on {card.name} (est., "
                   f"{t['estimated']} of {t['cells']} cells estimated), {_tokens(t['tokens'])} tokens read, peak "
                   + (f"{t['peak_gb']:.1f} GB per GPU ({t['peak_cell']})" if t["peak_gb"] is not None else "unknown"))
        remedies = {"evaluation": "a smaller evaluation --batch-size (the float32 logits of batch x seqlen x vocabulary)",
                    "training": "--nproc-per-node N with shard_logits, loss_chunk: 512 or optimizer: adamw-8bit",
                    "pruning": "fewer calibration samples (--n-samples)"}
        for phase, remedy in remedies.items():
            over = [c for c in self.cells if c.fits(card) is False and c.peak_phase == phase]
            if over:
                out.append(f"  ! {len(over)} cell(s) over the {card.memory_gb:g} GB of one {card.name} in {phase} "
                           f"(e.g. {over[0].label}, {over[0].peak_bytes / GB:.1f} GB): {remedy}, or a larger GPU")
        gated = sorted(a.split(" ", 1)[1] for a in t["access"] if a.startswith("token+licence "))
        hub = sorted(a.split(" ", 1)[1] for a in t["access"] if a.startswith("hub "))
        if gated:
            out.append(f"  access: a Hugging Face token with the licence accepted for {', '.join(gated)}")
        if hub:
            out.append(f"  access: the Hugging Face hub (or --data-dir / a filled cache) for {', '.join(hub)}")
        leap = [c for c in self.cells if c.method.split("+")[0] == "leap" and c.gpu_hours is not None
                and c.tokens.get("training", 0) >= 1e9]
        if leap:
            lo, hi = min(c.gpu_hours for c in leap), max(c.gpu_hours for c in leap)
            span = f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f}"
            out.append(f"  LEAP cells: {span} GPU-hours each here; the LEAP authors report "
                       f"{LEAP_REPORTED_GPU_HOURS[0]}-{LEAP_REPORTED_GPU_HOURS[1]} GPU-hours per cell for these models")
        return out


def _tokens(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def plan_grid(grid, cells, *, gpu_name: str = DEFAULT_GPU, utilisation: float = DEFAULT_UTILISATION,
              nproc: int = 1) -> Plan:
    card = gpu(gpu_name)
    utilisation = check_utilisation(utilisation)
    return Plan(card, utilisation, nproc, [plan_cell(grid, c, card, utilisation, nproc) for c in cells])


# ---------------------------------------------------------------------------------------------
# Checks before anything runs

def check_gpu_count(device: str, executor: str, nproc: int, gpus_per_cell, *, available: int | None = None) -> None:
    """A learned cell runs nproc processes, one per GPU on a CUDA grid: refuse a count the
    executor cannot give (a SLURM task's --gpus-per-cell; this machine's GPUs for a local run,
    `available`, None when unknown)."""
    if not str(device).startswith("cuda"):
        return
    if executor == "slurm":
        given = gpus_per_cell or 0
        if nproc > given:
            raise UserError(f"each cell runs {nproc} process(es), one per GPU, but --gpus-per-cell gives each array "
                            f"task {given}", hint=f"pass --gpus-per-cell {nproc}, or fewer --nproc-per-node")
    elif available is not None and nproc > available:
        raise UserError(f"--nproc-per-node {nproc} needs {nproc} GPUs, one per process, but this machine has {available}",
                        hint=f"use --nproc-per-node {max(available, 1)} or fewer, or --executor slurm")


def check_model_access(grid) -> None:
    """A gated hub model not already complete in the local cache cannot be read without a token:
    refuse before anything runs (a dry run lists it as missing instead)."""
    for spec in grid.models:
        if not (is_hub_model(spec) and spec.startswith(GATED_PREFIXES)):
            continue
        commit = _cached_hub_commit(spec, "main")
        if commit is not None and snapshot_complete(spec, commit):
            continue
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:
            token = None
        if not token:
            raise UserError(f"{spec} is gated and no Hugging Face token is set here (HF_TOKEN or `hf auth login`), "
                            "nor is the model in the local cache", hint=f"accept its licence on huggingface.co, then "
                                                                        f"`hf auth login`; or `hf download {spec}` "
                                                                        "where you can")
