"""The mask-learning engine: end-to-end training of masks over frozen weights.

The end-to-end counterpart of prunebench.engines.layerwise.  A learned method (LEAP, MaskLLM, PATCH)
supplies only its mask parameterisation as a `LearnedMaskPruner` subclass:

    init_logits(model, modules, ctx, report) -> {layer: {key: tensor}}  (the prior)
    masked_weight(layer, index, logits, weight, seed, sched) -> (M * W, {stat: tensor})
    regularisers(stats, sched)              -> ([loss terms], {metric: float})
    hard_masks(logits, spec)                -> {layer: bool mask}        (the final rule)
    schedule(step)                          -> {name: value}             (temperatures, scales)
    after_step(logits, step, sched)         -> None  (optional, in place: ProxSparse's proximal step)

and its config (a `MaskTrainingConfig` subclass with its presets).  The engine owns everything
else: freezing the model, the training stream and its held-out windows, micro-batching and
gradient accumulation, the optimizer and lr schedule, gradient clipping, the non-finite guard,
checkpoint and resume, the held-out curve of the hard mask, and the progress bar.

Randomness is counter-based: the data order is a function of (seed, step), and each layer's
mask noise of (method, seed, step, micro-batch, layer), so a resumed run or an activation-
checkpointing recomputation draws exactly what an uninterrupted run draws.

Several processes (torchrun, SLURM tasks; prunebench.engines.distributed) split each step's micro-batches
by their global index, so they draw the same masks on the same sequences as one process with the
same grad_accum would; DistributedDataParallel averages the gradients.  The training text is
either the cell's dataset held in memory (the embedded default) or, with `streaming`, a stream of
unique windows read on the fly (prunebench.data.stream: the papers' SlimPajama budget).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from prunebench.engines.distributed import DataParallel, LogitHolder
from prunebench.errors import UserError
from prunebench.store.records import atomic_write_json, sanitize_nonfinite
from prunebench.engines.state_files import FORMAT as STATE_FILE_FORMAT
from prunebench.engines.state_files import (
    FORMAT_VERSION, StateFileError, decode_optimizer, encode_optimizer, read_state, require, strict_json,
    write_state
)
from prunebench.modeling.output_head import OutputHead
from prunebench.modeling.models import (
    all_prunable, resolve_dtype, restore_prunable, snapshot_prunable, weight_matrix
)
from prunebench.progress import progress_bar
from prunebench.contract import Pruner, PruneReport
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.data.windows import stream_windows
from prunebench.modeling import sequence_start as starts
from prunebench.data.windows import eval_text, tokenizer_fingerprint
from prunebench.data.stream import WindowStream, open_documents
from prunebench.hashing import sha256_json

CHECKPOINT_VERSION = 1
STATE_FORMAT = f"{STATE_FILE_FORMAT}/{FORMAT_VERSION}"  # in the multi-process pointer file
LR_SCHEDULES = ("cosine", "constant")
# adamw: torch's AdamW, the moments in the logits' dtype (the authors' Hugging Face trainer);
# adamw-8bit: torchao's AdamW8bit, the same update with both moments stored 8-bit, block-wise.
OPTIMIZERS = ("adamw", "adamw-8bit")
# u ~ U[0, 1) is clamped to [eps, 1 - eps] before a logit or a log, so the noise stays finite.
NOISE_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Config shared by every learned method

@dataclass
class MaskTrainingConfig:
    """The engine's settings.  A subclass adds its method's fields and sets PRESETS; every field
    left as None is filled from the chosen preset."""

    PRESETS: ClassVar[dict] = {}
    # a preset's config for a called method applies to the preset's method only: naming another
    # method leaves that config unset (SparseGPT's dampening is no option of magnitude's)
    COUPLED: ClassVar[dict] = {"prior_config": "prior_method", "frozen_config": "frozen_method"}

    preset: str = "paper"  # fills every field left as None
    steps: Optional[int] = None  # optimizer steps T
    batch_size: Optional[int] = None  # sequences per optimizer step (global batch)
    seqlen: Optional[int] = None  # tokens per training sequence
    grad_accum: Optional[int] = None  # micro-batches per step (memory knob; batch_size % grad_accum == 0)
    lr: Optional[float] = None  # AdamW peak learning rate
    beta2: Optional[float] = None  # AdamW beta2
    weight_decay: Optional[float] = None  # AdamW weight decay on the logits
    warmup_steps: Optional[int] = None  # linear warm-up steps
    lr_schedule: Optional[str] = None  # "cosine" | "constant" after warm-up
    lr_final_ratio: Optional[float] = None  # the cosine decays to this fraction of the peak lr
    grad_clip: Optional[float] = None  # max global norm of the logit gradients (0: no clipping)
    init_std: Optional[float] = None  # std of the random initial logits
    prior_strength: Optional[float] = None  # prior shift in units of std(P)
    prior_method: Optional[str] = None  # registered one-shot method whose mask is the prior
    logits_dtype: Optional[str] = None  # dtype of the logits and their AdamW state
    gradient_checkpointing: Optional[bool] = None  # recompute block activations in backward
    checkpoint_every: Optional[int] = None  # save a resumable state to ctx.work_dir every N steps (0: never)
    heldout_windows: Optional[int] = None  # training-stream windows kept out for a held-out loss
    heldout_every: Optional[int] = None  # held-out loss of the hard mask every N steps (0: start and end)
    dataset: Optional[str] = None  # training stream; None: the cell's calibration dataset
    # Settings a preset may leave out (DEFAULTS then applies):
    streaming: Optional[bool] = None  # read `dataset` as a stream of unique windows (prunebench.data.stream), not in memory
    allow_stream_repeats: Optional[bool] = None  # streaming: start the corpus again when it runs out (recorded)
    shard_optimizer_state: Optional[bool] = None  # several processes: split the AdamW moments (ZeroRedundancyOptimizer)
    shard_logits: Optional[bool] = None  # several processes: shard the logits, gradients and moments per layer (FSDP2)
    loss_chunk: Optional[int] = None  # tokens per chunk of the output head + cross-entropy (0: all at once)
    optimizer: Optional[str] = None  # "adamw" | "adamw-8bit" (the moments quantised to 8 bits; needs torchao)

    DEFAULTS: ClassVar[dict] = {"streaming": False, "allow_stream_repeats": False, "shard_optimizer_state": False,
                                "shard_logits": False, "loss_chunk": 0, "optimizer": "adamw"}
    # Why a preset departs from the authors' settings (`paper`), written into every record.
    PRESET_PURPOSE: ClassVar[dict] = {
        "embedded": "the embedded default: SmolLM2-135M on a 2-core CPU in minutes (a short budget that starts "
                    "colder; the method's preset comment gives the measurements)",
        "tiny": "tiny random models in unit tests"}

    def __post_init__(self):
        presets = type(self).PRESETS
        if self.preset not in presets:
            raise UserError(f"unknown {type(self).__qualname__.split('.')[0]} preset {self.preset!r}",
                            hint=f"use one of {', '.join(presets)}")
        explicit = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        self._explicit = explicit - {"preset"}
        for key, value in presets[self.preset].items():
            if getattr(self, key) is None:
                coupled = self.COUPLED.get(key)
                if coupled in explicit and value is not None:
                    continue
                setattr(self, key, value)
        # every setting comes from the preset (None only where the preset itself says None)
        for key, value in self.DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        missing = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None
                   and f.name not in presets[self.preset] and f.name != "dataset"]
        for name in ("streaming", "allow_stream_repeats", "shard_optimizer_state", "shard_logits"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.shard_logits and self.shard_optimizer_state:
            raise UserError("shard_logits and shard_optimizer_state are two ways of sharding the moments",
                            hint="shard_logits shards the moments too (FSDP); keep one of them")
        if self.streaming and self.dataset is None:
            raise UserError("streaming needs a corpus to stream", hint="set dataset: slimpajama, c4, redpajama or a path")
        if missing:
            raise UserError(f"preset {self.preset!r} sets no value for {', '.join(missing)}", hint="give them explicitly")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "adamw-8bit":
            import importlib.util

            if importlib.util.find_spec("torchao") is None:
                raise UserError("optimizer adamw-8bit needs torchao, which is not installed",
                                hint="pip install 'prunebench[eightbit]', or use optimizer: adamw")
            if self.shard_optimizer_state:  # ZeRO rewrites the lr as a float, torchao keeps it a tensor
                raise UserError("optimizer adamw-8bit does not run under shard_optimizer_state",
                                hint="use shard_logits to shard 8-bit moments (FSDP)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown lr_schedule {self.lr_schedule!r}", hint=f"use one of {', '.join(LR_SCHEDULES)}")
        resolve_dtype(self.logits_dtype)
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise UserError(f"mask training needs steps >= 1 and batch_size ({self.batch_size}) divisible by "
                            f"grad_accum ({self.grad_accum})", hint="e.g. batch_size=256 grad_accum=64")
        if not 0.0 <= self.lr_final_ratio <= 1.0:
            raise UserError(f"lr_final_ratio {self.lr_final_ratio} is outside [0, 1]", hint="0 decays to zero, 0.1 to a tenth")
        if self.grad_clip < 0:
            raise UserError(f"grad_clip {self.grad_clip} is negative", hint="0 turns clipping off; the authors use 1.0")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise UserError(f"loss_chunk must be a whole number of tokens >= 0, got {self.loss_chunk!r}",
                            hint="0 computes the loss over all tokens at once; 512 keeps one 512-token chunk of logits")
        self.validate()

    def validate(self) -> None:
        """A method's own checks of its fields (called after the preset is filled in)."""

    def paper_differences(self) -> dict:
        """{field: {"used", "paper", "why"}} for every setting that differs from the authors'
        (the `paper` preset, or the paper preset this run is based on)."""
        presets = type(self).PRESETS
        reference = self.preset if self.preset.startswith("paper") else "paper"
        paper = {**self.DEFAULTS, **presets.get(reference, {})}
        out = {}
        for key, value in paper.items():
            used = getattr(self, key)
            if used != value:
                why = ("set for this run" if key in self._explicit
                       else self.PRESET_PURPOSE.get(self.preset, f"preset {self.preset!r}"))
                out[key] = {"used": used, "paper": value, "why": why}
        return out


# ---------------------------------------------------------------------------------------------
# Schedules (pure functions of the optimizer step t in [0, T])

def _fraction(step: int, total_steps: int) -> float:
    return min(max(step / max(total_steps, 1), 0.0), 1.0)


def linear_schedule(start: float, end: float, step: int, total_steps: int) -> float:
    """start + (end - start) * t/T: the temperature and scale schedules of every learned method."""
    return start + (end - start) * _fraction(step, total_steps)


def fading(weight: float, step: int, total_steps: int) -> float:
    """weight * (1 - t/T): a regulariser that fades out linearly over the run."""
    return weight * (1.0 - _fraction(step, total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              final_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then a
    cosine from 1 down to `final_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return final_ratio + (1.0 - final_ratio) * (0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Noise

def noise_seed(method: str, base_seed: int, step: int, micro: int, layer: int) -> int:
    """A counter-based seed for the noise of one layer in one micro-batch: fresh noise on every
    forward, yet reproducible from (seed, step, micro-batch, layer) alone, so no generator state
    needs saving and a checkpointing recomputation draws the same mask."""
    text = f"{method}-noise:{base_seed}:{step}:{micro}:{layer}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def logistic_noise(shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """L ~ Logistic(0, 1) = logit(U), U ~ Uniform(0, 1) (the difference of two Gumbels)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return torch.logit_(u, eps=NOISE_EPS)


def gumbel_noise(shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """G ~ Gumbel(0, 1) = -log(-log U)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp_(NOISE_EPS, 1.0 - NOISE_EPS)
    return u.log_().neg_().log_().neg_()


def mask_sparsity(masks: dict) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


# ---------------------------------------------------------------------------------------------
# Patching the model's linears

class MaskedLinears:
    """Swaps the forward of every prunable linear for one that computes with a mask.

    mode 'soft': the method's sampled soft mask (training); 'hard': given hard masks (held-out
    evaluation); 'off': the dense weights.  The modules' weights are never written while patched.
    The statistics each soft forward returns are kept per layer (a checkpointing recomputation
    overwrites them, never double counts).
    """

    def __init__(self, modules: dict, logits, pruner: "LearnedMaskPruner"):
        # logits: a LogitHolder (the engine's), or {layer: {key: nn.Parameter}} (scripts, tests)
        self.logits = logits if isinstance(logits, LogitHolder) else LogitHolder(logits)
        self.modules, self.pruner = modules, pruner
        self.mode = "off"
        self.sched: dict = {}
        self.seed, self.step, self.micro = 0, 0, 0
        self.hard: dict = {}
        self.stats: dict = {}
        self._saved_forward = {}
        for index, (name, module) in enumerate(modules.items()):
            self._saved_forward[name] = module.__dict__.get("forward")
            module.forward = self._make_forward(name, index, module)

    def _make_forward(self, name, index, module):
        def forward(x):
            # [out, in] whatever the storage (GPT-2's Conv1D stores [in, out]): masks, logits and
            # 2:4 groups always run along the input dimension, and F.linear serves both.
            weight = weight_matrix(module)
            if self.mode == "soft":
                seed = noise_seed(self.pruner.name, self.seed, self.step, self.micro, index)
                # through the layer's logits module: sharded logits are gathered only for it
                weight, self.stats[name] = self.logits.layer(name)(
                    lambda tensors: self.pruner.masked_weight(name, index, tensors, weight, seed, self.sched))
            elif self.mode == "hard":
                weight = weight * self.hard[name].to(device=weight.device, dtype=weight.dtype)
            return F.linear(x, weight, module.bias)

        return forward

    def remove(self):
        for name, module in self.modules.items():
            saved = self._saved_forward[name]
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved


# ---------------------------------------------------------------------------------------------
# The engine

class LearnedMaskPruner(Pruner):
    """Base of every learned-mask method; `prune` runs the shared training loop."""

    engine_modules: ClassVar[tuple] = ("prunebench.engines.masklearn",)
    kind: ClassVar[str] = "learned"
    # A learned method brings a `tiny` preset (a few steps on a tiny model) for the conformance suite.
    test_config: ClassVar[dict] = {"preset": "tiny"}
    # schedule entries written to the training curves every step
    logged_schedule: ClassVar[tuple] = ()

    # -- what a method supplies --------------------------------------------------------------

    def init_logits(self, model, modules: dict, ctx, report: PruneReport) -> dict:
        """{layer: {key: tensor}}: the initial logits (from the prior), on the CPU is fine."""
        raise NotImplementedError

    def frozen_keys(self) -> tuple:
        """Keys of init_logits' tensors that stay fixed (PATCH's Tile mode: the frozen 2:4 masks)."""
        return ()

    def logits_per_weight(self, spec: SparsitySpec) -> float:
        """Trained mask parameters per masked weight at `spec` (one by default), for the memory plan."""
        return 1.0

    def begin(self, modules: dict, spec: SparsitySpec) -> None:
        """Per-run constants the regularisers need (called on a fresh and on a resumed run)."""

    def masked_weight(self, layer: str, index: int, logits: dict, weight: torch.Tensor, seed: int,
                      sched: dict) -> tuple:
        """(M * W for this forward, {statistic: tensor}) with M the sampled soft mask; weight is
        the frozen [out, in] matrix."""
        raise NotImplementedError

    def regularisers(self, stats: dict, sched: dict) -> tuple:
        """([loss terms added to the cross-entropy, in order], {metric: float for the curves})."""
        return [], {}

    def hard_masks(self, logits: dict, spec: SparsitySpec) -> dict:
        """{layer: bool keep-mask}: the method's final rule on the current logits."""
        raise NotImplementedError

    def schedule(self, step: int) -> dict:
        raise NotImplementedError

    def after_step(self, logits: dict, step: int, sched: dict) -> None:
        """Called after every optimizer step, before the lr scheduler's, under no_grad, with
        {layer: {key: the trainable tensor itself}} (sharded: a DTensor, to_local() its shard), to be
        updated in place: a proximal-gradient method's proximal operator.  A no-op by default."""

    def finish(self, logits: dict, masks: dict, spec: SparsitySpec, report: PruneReport) -> None:
        """Method-specific statistics of the result, written into the report."""

    def uses_methods(self) -> tuple:
        return (self.config.prior_method,) if self.config.prior_method else ()

    # -- helpers for methods ------------------------------------------------------------------

    def one_shot_masks(self, model, modules: dict, ctx, method: str, spec: SparsitySpec, config=None) -> dict:
        """Keep-masks of a registered one-shot method at `spec`; the dense weights are restored.

        Weights that were exactly zero before count as pruned (weight == 0 afterwards), which is
        what a score-based method would choose for them anyway.
        """
        if ctx.registry is None:
            from prunebench import registry as reg
        else:
            reg = ctx.registry
        snapshot = snapshot_prunable(model)
        prior = reg.create(method, config or {})
        try:
            prior.prune(model, dataclasses.replace(ctx, sparsity=spec, progress=False))
            keep = {name: (weight_matrix(m).detach() != 0) for name, m in modules.items()}
        finally:
            restore_prunable(model, snapshot)
        return keep

    def training_windows(self, ctx):
        """(dataset, train windows, held-out windows, stream fingerprint): every window of the
        training text once, a seeded few of them held out.  With `streaming`, train is a
        WindowStream whose first windows are the held-out ones.  Every window starts with the
        tokenizer's sequence start (prunebench.modeling.sequence_start); the loss predicts every position
        after the first, so a start of more than one token would be predicted: refused."""
        c = self.config
        dataset = c.dataset or ctx.calibration_dataset
        if ctx.tokenizer is None:
            raise UserError(f"{self.display or self.name} draws its own training stream and needs the tokenizer "
                            "in the context", hint="the runner passes it; in scripts set PruneContext(tokenizer=...)")
        start = starts.sequence_start_ids(ctx.tokenizer)
        if len(start) > 1:
            raise UserError(f"{self.display or self.name}: the tokenizer starts every sequence with {len(start)} tokens "
                            f"{start}; the training loss would predict all but the first of them",
                            hint="learned masks train on tokenizers that start a sequence with at most one token")
        if c.streaming:
            return self._streamed_windows(ctx, dataset)
        windows, fingerprint = stream_windows(ctx.tokenizer, dataset, c.seqlen, ctx.data_dir)
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(len(windows), generator=gen)
        n_heldout = min(c.heldout_windows, max(len(windows) - c.batch_size, 0))
        return dataset, windows[order[n_heldout:]], windows[order[:n_heldout]], fingerprint

    def _streamed_windows(self, ctx, dataset):
        """The papers' stream: unique windows read on the fly, none overlapping the cell's
        evaluation text; the first `heldout_windows` are held out, training reads on from there."""
        c = self.config
        exclude = "\n\n".join(eval_text(d, ctx.data_dir) for d in ctx.eval_datasets) or None
        stream = WindowStream(open_documents(dataset, ctx.data_dir), ctx.tokenizer, c.seqlen, exclude_text=exclude,
                              allow_repeats=c.allow_stream_repeats)
        heldout = stream.take(0, c.heldout_windows) if c.heldout_windows else torch.zeros(0, c.seqlen, dtype=torch.long)
        what = {"stream": stream.stats["fingerprint"], "tok": tokenizer_fingerprint(ctx.tokenizer),
                "seqlen": c.seqlen, "excluded": stream.stats.get("excluded_text_sha256")}
        if stream.prefix:  # windows that start with the tokenizer's sequence start are other windows
            what["start"] = stream.prefix
        fingerprint = sha256_json(what)[:16]
        return dataset, StreamedBatches(stream, len(heldout)), heldout, fingerprint

    def batch(self, train, step: int, seed: int) -> torch.Tensor:
        """The sequences of optimizer step `step`: consecutive slices of a seeded permutation of
        the whole stream, reshuffled (seed, epoch) when it runs out; a pure function of the step.
        A streamed source: the step's consecutive windows of the stream."""
        bs = self.config.batch_size
        if isinstance(train, StreamedBatches):
            return train.take(step * bs, bs)
        n = len(train)
        epoch, index = divmod(step, n // bs)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return train[order[index * bs:(index + 1) * bs]]

    @property
    def checkpoint_file(self) -> str:
        return f"{self.name}_state.safetensors"

    # -- the loop -----------------------------------------------------------------------------

    def prune(self, model, ctx) -> PruneReport:
        # As the temperature falls the sampled masks saturate: their gradients and the AdamW
        # second moments underflow into denormal floats, which x86 CPUs process ~10x slower
        # (measured with LEAP: steps went from 3.5 s to 27 s).  Flushing them to zero (this
        # thread) changes nothing that matters numerically.
        flushed = torch.set_flush_denormal(True)
        try:
            try:
                return self._train(model, ctx)
            except _Unresumable as exc:  # a checkpoint that does not fit the run: never trusted
                where = Path(ctx.work_dir) / self.checkpoint_file
                refused = f"{self.display or self.name}: ignored checkpoint {where}: {exc}; the cell starts from scratch"
                return self._train(model, ctx, refused=refused)
        finally:
            if flushed:
                torch.set_flush_denormal(False)  # the process default

    def _train(self, model, ctx, refused: Optional[str] = None) -> PruneReport:
        """refused: the line saying why the checkpoint was not resumed (the second try)."""
        self.check_spec(ctx.sparsity)
        c, spec = self.config, ctx.sparsity
        who = self.display or self.name
        report = PruneReport(stats={"config": dataclasses.asdict(c), "scope": self.report_scope(spec),
                                    "paper_differences": c.paper_differences()})
        if refused:
            report.warnings.append(refused)
        modules = all_prunable(model)
        device = torch.device(ctx.device)
        logits_dtype = resolve_dtype(c.logits_dtype)
        t_start = time.perf_counter()

        dp = DataParallel.current()
        micros = dp.micro_batches(c.grad_accum, who)  # this process's share of each step
        dataset, train, heldout, fingerprint = self.training_windows(ctx)
        streamed = isinstance(train, StreamedBatches)
        report.stats.update(dataset=dataset, heldout_windows=len(heldout), stream_fingerprint=fingerprint,
                            n_masked=sum(m.weight.numel() for m in modules.values()))
        if dp.active:
            report.stats.update(processes=dp.world, micro_batches_per_process=len(micros))
        if not streamed:
            report.stats["train_windows"] = len(train)
        micro_size = c.batch_size // c.grad_accum
        if not streamed and len(train) < c.batch_size:
            raise UserError(f"the {dataset} training stream has {len(train)} windows of {c.seqlen}, fewer than one "
                            f"batch of {c.batch_size}", hint="use a shorter seqlen or a larger dataset")
        windows_needed = c.steps * c.batch_size
        if not streamed:
            report.stats["stream_repeats"] = round(windows_needed / len(train), 3)
        if not streamed and windows_needed > len(train):
            report.warnings.append(f"{who}: {c.steps} steps x {c.batch_size} sequences need {windows_needed} windows "
                                   f"but the {dataset} stream has {len(train)}: the text repeats "
                                   f"{windows_needed / len(train):.1f} times (risk of overfitting, LEAP.md section 6)")

        state_path = Path(ctx.work_dir) / self.checkpoint_file if ctx.work_dir and c.checkpoint_every else None
        run_key = self._run_key(ctx, modules, fingerprint)
        resumed = None if refused else self._load_state(state_path, run_key, report, dp, layers=list(modules))

        if resumed is None:
            t0 = time.perf_counter()
            initial = self.init_logits(model, modules, ctx, report)
            report.stats["prior_s"] = round(time.perf_counter() - t0, 3)
        elif resumed.get("layout") is not None:  # sharded logits: placeholders, the shards are read below
            initial = {layer: {key: torch.zeros(shape) for key, (shape, _) in keys.items()}
                       for layer, keys in resumed["layout"].items()}
        else:
            initial = resumed["logits"]
        frozen = self.frozen_keys()
        holder = LogitHolder({layer: {key: nn.Parameter(t.to(device=device, dtype=logits_dtype),
                                                        requires_grad=key not in frozen)
                                      for key, t in initial[layer].items()} for layer in modules})
        del initial
        self.begin(modules, spec)

        sharded = dp.active and c.shard_logits
        # DDP averages the logit gradients across processes; FSDP shards the logits per layer
        step_module = dp.wrap(holder, device, shard_logits=sharded)
        params = holder.trainable()  # after wrapping: FSDP replaces them with their shards
        optimizer = dp.make_optimizer(params, lambda ps: make_adamw(ps, c), c.shard_optimizer_state)
        if sharded:
            report.stats["logits_bytes_per_process"] = holder.local_bytes()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, c.steps, c.warmup_steps, c.lr_schedule, c.lr_final_ratio))
        curves = {"step": [], "loss": [], "ce": []}
        start_step = 0
        if resumed is not None:
            # every process its logit shards (sharded), its moments or its share of them, the
            # schedule; each checked against what it goes into (_Unresumable: start afresh)
            self._restore(resumed, holder, optimizer, scheduler, modules, spec, dp)
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                # a shard restores only the local optimizer; the lr lives in the groups (a tensor
                # for torchao's optimizers, which must keep it one)
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            curves = resumed["curves"]
            start_step = resumed["step"]
            report.stats["resumed_from_step"] = start_step

        # Freeze everything; only the logits learn.  Restore the flags afterwards.
        grad_flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        was_training = model.training
        checkpointing = bool(c.gradient_checkpointing) and enable_checkpointing(model)
        if checkpointing:
            model.train()  # transformers checkpoints only in training mode
        else:
            model.eval()  # no dropout: the only randomness is the mask noise
        patch = MaskedLinears(modules, holder, self)
        patch.seed = ctx.seed
        head = OutputHead.of(model, hint="set loss_chunk: 0 to compute the loss from the model's own logits") \
            if c.loss_chunk else None
        bar = progress_bar(total=c.steps, desc=f"{self.name} {spec.label}", enabled=ctx.progress, unit="step")
        bar.update(start_step)
        try:
            if resumed is None:
                self._heldout(model, patch, heldout, spec, 0, curves, micro_size, device, dp, head=head)
                if curves.get("heldout_loss"):
                    report.stats["prior_heldout_loss"] = curves["heldout_loss"][0]
                    report.stats["prior_heldout_ppl"] = curves["heldout_ppl"][0]
            for step in range(start_step, c.steps):
                sched = self.schedule(step)
                patch.mode, patch.step, patch.sched = "soft", step, sched
                optimizer.zero_grad(set_to_none=True)
                batch_ids = None if streamed else self.batch(train, step, ctx.seed)
                logged = {"loss": 0.0, "ce": 0.0}
                for micro in micros:  # global micro-batch indices: the data and the noise follow them
                    patch.micro = micro
                    if streamed:
                        ids = train.take(step * c.batch_size + micro * micro_size, micro_size).to(device)
                    else:
                        ids = batch_ids[micro * micro_size:(micro + 1) * micro_size].to(device)
                    patch.stats.clear()
                    with dp.no_sync(step_module, last_micro=micro == micros[-1]):
                        ce = step_module(lambda: model_lm_loss(model, ids, head, c.loss_chunk))
                        terms, metrics = self.regularisers(patch.stats, sched)
                        loss = ce
                        for term in terms:
                            loss = loss + term
                        finite = bool(torch.isfinite(loss))
                        if dp.any_true(not finite):  # every process stops, not only the one that saw it
                            where = (f"micro-batch {micro}; ce {ce.item()}" if not finite
                                     else "on another process")
                            raise FloatingPointError(f"{who}: non-finite loss {loss.item()} at step {step} ({where})")
                        # / this process's share: DDP (FSDP) then averages over the processes, so
                        # the gradient is the mean over all grad_accum micro-batches
                        (loss / len(micros)).backward()
                    logged["loss"] += loss.item() / c.grad_accum
                    logged["ce"] += ce.item() / c.grad_accum
                    for name, value in metrics.items():
                        logged[name] = logged.get(name, 0.0) + value / c.grad_accum
                del loss, ce, terms
                patch.stats.clear()
                logged = dp.sum_floats(logged)
                if c.grad_clip:
                    logged["grad_norm"] = dp.clip_grad_norm(params, c.grad_clip)
                    if not math.isfinite(logged["grad_norm"]):
                        raise FloatingPointError(f"{who}: non-finite gradient norm at step {step}")
                optimizer.step()
                with torch.no_grad():
                    self.after_step({name: dict(unit.tensors) for name, unit in zip(holder.names, holder.layers)},
                                    step, sched)
                scheduler.step()
                row = {"step": step, **logged, **{k: sched[k] for k in self.logged_schedule}}
                for name, value in row.items():
                    curves.setdefault(name, []).append(round(value, 6) if isinstance(value, float) else value)
                bar.update(1)
                bar.set_postfix(loss=f"{logged['loss']:.3f}",
                                **{k: f"{v:.3g}" for k, v in logged.items() if k not in ("loss", "ce")},
                                **{k: f"{sched[k]:.3g}" for k in self.logged_schedule})
                done = step + 1
                if c.heldout_every and done % c.heldout_every == 0 and done < c.steps:
                    self._heldout(model, patch, heldout, spec, done, curves, micro_size, device, dp, head=head)
                if state_path is not None and done % c.checkpoint_every == 0 and done < c.steps:
                    self._checkpoint(dp, state_path, run_key, holder, optimizer, scheduler, done, curves)
            patch.mode = "off"
            masks = self.hard_masks(holder.full(), spec)
            self._heldout(model, patch, heldout, spec, c.steps, curves, micro_size, device, dp, masks=masks,
                          head=head)
        finally:
            bar.close()
            patch.remove()
            if checkpointing:
                disable_checkpointing(model)
            model.train(was_training)
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)

        # Apply the hard mask to the weights in place: the runner measures sparsity from them.
        with torch.no_grad():
            for name, module in modules.items():
                weight_matrix(module).mul_(masks[name].to(module.weight.dtype))
        achieved = mask_sparsity(masks)
        # the output checks count these masks, not the weights' zeros (the dense model has some)
        report.masks = {name: m.to("cpu") for name, m in masks.items()}
        self.finish(holder.full(), masks, spec, report)
        report.stats.update(curves=curves, achieved_sparsity=achieved, steps=c.steps,
                            tokens_seen=(c.steps - start_step) * c.batch_size * c.seqlen,
                            train_s=round(time.perf_counter() - t_start, 3),
                            logits_bytes=sum(p.numel() * p.element_size() for p in holder.parameters()),
                            optimizer_state_bytes_per_process=optimizer_state_bytes(optimizer),
                            per_layer_sparsity={name: round(1.0 - m.float().mean().item(), 6)
                                                for name, m in masks.items()})
        if curves.get("heldout_loss"):
            report.stats["heldout_loss"] = curves["heldout_loss"][-1]
            report.stats["heldout_ppl"] = curves["heldout_ppl"][-1]
        if streamed:
            report.stats["stream"] = train.stats
            report.stats["stream_repeats"] = train.stats["repeats"]
            if train.stats["repeats"]:
                report.warnings.append(f"{who}: the {dataset} stream ran out and was read {train.stats['passes']} "
                                       f"times (allow_stream_repeats)")
        dp.barrier()  # every process is past its last read of the checkpoint
        if dp.is_main and state_path is not None:
            _remove_state(state_path)  # the finished result is in the weights; a stale state must not resume
        del optimizer, params, holder, step_module
        return report

    def report_scope(self, spec: SparsitySpec) -> str:
        """The scope at which the runner checks the achieved sparsity."""
        return spec.scope or "global"

    # -- pieces of the loop -------------------------------------------------------------------

    @torch.no_grad()
    def _heldout(self, model, patch, heldout, spec, step, curves, micro_size, device, dp=DataParallel(), masks=None,
                 head=None):
        """Mean next-token loss of the current hard mask on the held-out windows (several
        processes: each scores every world-th chunk, the sums are added)."""
        if len(heldout) == 0:
            return
        patch.hard = masks if masks is not None else self.hard_masks(patch.logits.full(), spec)
        patch.mode = "hard"
        total, count = 0.0, 0
        starts = range(0, len(heldout), max(micro_size, 1))
        for start in starts[dp.rank::dp.world]:
            ids = heldout[start:start + micro_size].to(device)
            n_tok = ids[:, 1:].numel()
            total += model_lm_loss(model, ids, head, self.config.loss_chunk).item() * n_tok
            count += n_tok
        sums = dp.sum_floats({"total": total, "count": count})
        loss = sums["total"] / sums["count"]
        for name, value in (("heldout_step", step), ("heldout_loss", round(loss, 6)),
                            ("heldout_ppl", round(math.exp(min(loss, 700.0)), 4)),
                            ("heldout_sparsity", round(mask_sparsity(patch.hard), 6))):
            curves.setdefault(name, []).append(value)
        patch.hard = {}
        patch.mode = "off"

    def _run_key(self, ctx, modules, fingerprint) -> str:
        """What a checkpoint must match to be resumed: method, config, target, seed, data, shapes."""
        key = {"v": CHECKPOINT_VERSION, "method": self.name, "config": dataclasses.asdict(self.config),
               "sparsity": ctx.sparsity.to_dict(), "seed": ctx.seed, "stream": fingerprint,
               "shapes": [[n, list(m.weight.shape)] for n, m in modules.items()]}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _checkpoint(self, dp, path: Path, run_key, holder, optimizer, scheduler, step, curves) -> None:
        """One process: the whole state in one file.  Several: one file per process in a directory
        per step, nothing gathered (replicated logits, schedule and curves from rank 0 alone; with
        shard_optimizer_state each process writes only its own AdamW moments; with shard_logits
        each its own shards of the logits and of their moments), made current when rank 0
        atomically rewrites the pointer file.  Every file: tensors in safetensors, the rest
        strict JSON (prunebench.engines.state_files): nothing read back can run code."""
        if not dp.active:
            self._save_state(path, run_key, holder.full(), optimizer, scheduler, step, curves)
            return
        shard_dir = _shard_dir(path, step)
        shard_dir.mkdir(parents=True, exist_ok=True)
        zero = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer: this process's share
        mode = "sharded" if holder.sharded else "zero" if zero is not None else "replicated"
        meta, tensors = {"run_key": run_key, "step": step, "world": dp.world, "rank": dp.rank, "mode": mode}, {}
        if mode == "sharded":  # every process: its own shards, read back by the same rank
            logits = {name: {key: p.detach().to_local() for key, p in unit.tensors.items()}
                      for name, unit in zip(holder.names, holder.layers)}
            _put_logits(meta, tensors, logits)
            _put_optimizer(meta, tensors, optimizer)
        elif zero is not None:
            _put_optimizer(meta, tensors, zero)
        if dp.is_main:
            if mode != "sharded":  # replicated: every process holds the same full logits
                _put_logits(meta, tensors, holder.full())
            if mode == "replicated":
                _put_optimizer(meta, tensors, optimizer)
            _put_replicated(meta, tensors, scheduler, curves)
            if mode == "sharded":
                meta["layout"] = holder.layout()
        write_state(_shard_file(shard_dir, dp.rank), meta, tensors)
        dp.barrier()  # every shard is on disk before the pointer names them
        if dp.is_main:
            pointer = {"format": STATE_FORMAT, "run_key": run_key, "step": step, "world": dp.world,
                       "dir": shard_dir.name}
            atomic_write_json(_pointer(path), pointer)
            for old in path.parent.glob(f"{path.stem}.step*"):  # earlier steps: superseded
                if old != shard_dir:
                    shutil.rmtree(old, ignore_errors=True)
        dp.barrier()

    def _save_state(self, path: Path, run_key, logits, optimizer, scheduler, step, curves) -> None:
        """Atomic: write a temp file, then os.replace.  The noise and data order are counter-based
        functions of (seed, step), so no generator state is needed beyond the step."""
        meta, tensors = {"run_key": run_key, "step": step, "world": 1, "rank": 0, "mode": "single"}, {}
        _put_logits(meta, tensors, logits)
        _put_optimizer(meta, tensors, optimizer)
        _put_replicated(meta, tensors, scheduler, curves)
        write_state(path, meta, tensors)

    def _load_state(self, path: Optional[Path], run_key, report, dp=DataParallel(), layers=None):
        """The checkpoint to resume from, or None.  Read as data only and checked (format, run,
        step, tensors); one that fails is named in one warning line and ignored, and a pickle of
        the old format is never opened.  Several processes: all of them resume, or none does."""
        if path is None:
            return None
        who = self.display or self.name
        legacy = path.with_suffix(".pt")
        if legacy.exists() or (dp.active and any(path.parent.glob(f"{path.stem}.step*/rank*.pt"))):
            report.warnings.append(f"{who}: ignored an old-format checkpoint beside {path} (a pickle: never loaded)")
        state, reason = None, None
        try:
            state = self._read_checkpoint(path, run_key, dp, layers)
        except StateFileError as exc:
            reason = str(exc)
        if dp.any_true(state is None):  # one process cannot resume: none does
            if reason is not None:
                report.warnings.append(f"{who}: ignored checkpoint {reason}; the cell starts from scratch")
            return None
        return state

    def _read_checkpoint(self, path: Path, run_key, dp, layers):
        """This process's view of the checkpoint (None if there is none); StateFileError naming
        the file and the reason otherwise."""
        if not dp.active:
            if not path.exists():
                return None
            where = path
            main = own = _read_part(path, run_key, 1, 0, None, "single")
        else:
            pointer_path = _pointer(path)
            try:
                pointer = strict_json(pointer_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError, StateFileError) as exc:
                raise StateFileError(f"{pointer_path}: {str(exc).splitlines()[0]}") from None
            if not isinstance(pointer, dict) or pointer.get("format") != STATE_FORMAT:
                raise StateFileError(f"{pointer_path}: an old-format or foreign checkpoint pointer")
            if pointer.get("run_key") != run_key:
                raise StateFileError(f"{pointer_path}: from a different run (config, data or seed differ)")
            if pointer.get("world") != dp.world:
                raise StateFileError(f"{pointer_path}: written by {pointer.get('world')} processes, this run has "
                                     f"{dp.world} (the optimizer shards follow the process count)")
            step = pointer.get("step")
            if type(step) is not int or pointer.get("dir") != _shard_dir(path, step).name:  # no path from the file
                raise StateFileError(f"{pointer_path}: malformed")
            shard_dir = where = _shard_dir(path, step)
            main = _read_part(_shard_file(shard_dir, 0), run_key, dp.world, 0, step, None)
            own = main if dp.rank == 0 else _read_part(_shard_file(shard_dir, dp.rank), run_key, dp.world, dp.rank,
                                                       step, main[0]["mode"])
        (meta, tensors), (own_meta, own_tensors) = main, own
        try:
            return self._checked_state(meta, tensors, own_meta, own_tensors, layers)
        except StateFileError as exc:
            raise StateFileError(f"{where}: {exc}") from None

    def _checked_state(self, meta, tensors, own_meta, own_tensors, layers) -> dict:
        """The resumable state from rank 0's part (replicated) and this process's (its shards),
        checked for everything that is known before the logits exist."""
        step, mode = meta["step"], meta["mode"]
        require(0 < step < self.config.steps, f"step {step} is outside this run's 1..{self.config.steps - 1}")
        curves = meta.get("curves")
        require(isinstance(curves, dict) and all(isinstance(v, list) and all(_scalar(x) for x in v)
                                                 for v in curves.values())
                and len(curves.get("step", [])) == step, "its training curves do not match its step")
        require(isinstance(meta.get("scheduler"), dict), "no lr schedule")
        rng = tensors.get("torch_rng")
        require(rng is not None and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape,
                "no generator state")
        # sharded logits: this process's shards; sharded moments (zero, sharded): its own
        logits = _get_logits(*((own_meta, own_tensors) if mode == "sharded" else (meta, tensors)), layers,
                             resolve_dtype(self.config.logits_dtype))
        opt_meta, opt_tensors = (own_meta, own_tensors) if mode in ("sharded", "zero") else (meta, tensors)
        state = {"step": step, "mode": mode, "curves": curves, "scheduler": meta["scheduler"], "torch_rng": rng,
                 "logits": logits, "optimizer": (opt_meta.get("optimizer"), opt_tensors)}
        if mode == "sharded":  # the full shapes the placeholders take (FSDP then shards them)
            layout = meta.get("layout")
            require(isinstance(layout, dict) and list(layout) == list(logits)
                    and all(isinstance(keys, dict) and list(keys) == list(logits[name])
                            and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], list)
                                    and all(type(d) is int and d >= 0 for d in v[0]) for v in keys.values())
                            for name, keys in layout.items()), "its layout does not match its logits")
            state["layout"] = layout
        return state

    def _restore(self, resumed, holder, optimizer, scheduler, modules, spec, dp):
        """Load a checked checkpoint into the run's logits, optimizer and schedule, each tensor
        checked against what it goes into.  Any mismatch on any process: _Unresumable on all."""
        reason = None
        try:
            if resumed["mode"] == "sharded":  # this process's shards, in place
                with torch.no_grad():
                    for name, unit in zip(holder.names, holder.layers):
                        require(list(unit.tensors) == list(resumed["logits"][name]), f"layer {name}: other logits")
                        for key, p in unit.tensors.items():
                            local, t = p.to_local(), resumed["logits"][name][key]
                            require(t.shape == local.shape, f"logits {name}.{key}: shard {list(t.shape)}, this "
                                                            f"process holds {list(local.shape)}")
                            local.copy_(t)
            target = optimizer.optim if resumed["mode"] == "zero" else optimizer
            opt_meta, opt_tensors = resumed["optimizer"]
            target.load_state_dict(decode_optimizer(opt_meta, opt_tensors, target))
            live = scheduler.state_dict()
            saved = resumed["scheduler"]
            require(set(saved) == set(live) and all(_same_json_type(saved[k], live[k]) for k in live)
                    and saved.get("last_epoch") == resumed["step"], "its lr schedule does not match its step")
            scheduler.load_state_dict(saved)
        except Exception as exc:  # ours (StateFileError) or torch's own checks of a state dict
            reason = _one_line(exc)
        if dp.any_true(reason is not None):
            raise _Unresumable(reason or "another process could not use its part")
        # The logits must give masks of the run's weights (the one check of their shapes against
        # the model that needs no prior): the method's own final rule, on every process.
        full = holder.full()
        try:
            masks = self.hard_masks(full, spec)
            require(list(masks) == list(modules) and all(
                tuple(masks[n].shape) == tuple(weight_matrix(m).shape) for n, m in modules.items()),
                "its logits do not give masks of this model's weights")
        except StateFileError as exc:
            reason = str(exc)
        except Exception as exc:  # the method's rule failed on them
            reason = f"its logits do not fit this model ({_one_line(exc)})"
        del full
        if dp.any_true(reason is not None):
            raise _Unresumable(reason or "another process could not use its part")
        torch.set_rng_state(resumed["torch_rng"])


class _Unresumable(Exception):
    """A checkpoint that passed reading but does not fit the run: the cell starts from scratch."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _same_json_type(saved, live) -> bool:
    if isinstance(live, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(live) and all(
            _same_json_type(s, v) for s, v in zip(saved, live))
    if isinstance(live, float):
        return type(saved) in (int, float)
    return type(saved) is type(live)


def _put_logits(meta: dict, tensors: dict, logits: dict) -> None:
    """{layer: {key: tensor}} as tensors logits/<layer>/<key> and their order in the JSON."""
    meta["logits"] = [[layer, list(keys)] for layer, keys in logits.items()]
    for layer, keys in logits.items():
        for key, t in keys.items():
            tensors[f"logits/{layer}/{key}"] = t


def _get_logits(meta: dict, tensors: dict, layers, dtype) -> dict:
    listing = meta.get("logits")
    require(isinstance(listing, list) and all(isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)
                                              and isinstance(row[1], list) and row[1]
                                              and all(isinstance(k, str) for k in row[1]) for row in listing),
            "no logits")
    out = {}
    for layer, keys in listing:
        require(layer not in out and len(set(keys)) == len(keys), "its logits are listed twice")
        out[layer] = {}
        for key in keys:
            t = tensors.get(f"logits/{layer}/{key}")
            require(t is not None, f"logits {layer}.{key} are missing")
            require(t.dtype == dtype, f"logits {layer}.{key} are {t.dtype}, this run trains {dtype}")
            out[layer][key] = t
    require(layers is None or list(out) == list(layers), "its layers are not this model's prunable layers")
    return out


def _put_optimizer(meta: dict, tensors: dict, optimizer) -> None:
    meta["optimizer"], more = encode_optimizer(optimizer.state_dict())
    tensors.update(more)


def _put_replicated(meta: dict, tensors: dict, scheduler, curves) -> None:
    """What every process holds alike: the lr schedule, the curves (non-finite values as null,
    as the record stores them) and the generator state."""
    curves = json.loads(json.dumps(curves, default=float))
    sanitize_nonfinite(curves)
    meta.update(scheduler=scheduler.state_dict(), curves=curves)
    tensors["torch_rng"] = torch.get_rng_state()


def _read_part(path: Path, run_key, world, rank, step, mode):
    """One process's file, checked against the pointer and rank 0's (StateFileError naming it)."""
    try:
        meta, tensors = read_state(path)
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing") from None
    except StateFileError as exc:
        raise StateFileError(f"{path}: {exc}") from None
    if meta.get("run_key") != run_key:
        raise StateFileError(f"{path}: from a different run (config, data or seed differ)")
    if (meta.get("world"), meta.get("rank")) != (world, rank) or (step is not None and meta.get("step") != step) \
            or type(meta.get("step")) is not int:
        raise StateFileError(f"{path}: does not match its checkpoint (step, process)")
    expected = ("single",) if world == 1 else ("replicated", "zero", "sharded")
    if meta.get("mode") not in expected or (mode is not None and meta.get("mode") != mode):
        raise StateFileError(f"{path}: written for another way of running")
    return meta, tensors


def _remove_state(path: Path) -> None:
    """A checkpoint's every file: the single-process file, the pointer (first: without it the
    shards are never read) and the shard directories; and an old-format file, never read."""
    path.unlink(missing_ok=True)
    path.with_suffix(".pt").unlink(missing_ok=True)
    _pointer(path).unlink(missing_ok=True)
    for shard_dir in path.parent.glob(f"{path.stem}.step*"):
        shutil.rmtree(shard_dir, ignore_errors=True)


def _shard_dir(path: Path, step: int) -> Path:
    return path.with_name(f"{path.stem}.step{step:07d}")


def _shard_file(shard_dir: Path, rank: int) -> Path:
    return shard_dir / f"rank{rank}.safetensors"


def _pointer(path: Path) -> Path:
    """The file naming the current sharded checkpoint of `path`."""
    return path.with_name(f"{path.stem}.latest.json")


class StreamedBatches:
    """A WindowStream seen from the training loop: window i of training is the stream's window
    offset + i (the first `offset` are the held-out ones)."""

    def __init__(self, stream, offset: int):
        self.stream, self.offset = stream, offset

    def take(self, start: int, count: int) -> torch.Tensor:
        return self.stream.take(self.offset + start, count)

    @property
    def stats(self) -> dict:
        return self.stream.stats


def enable_checkpointing(model) -> bool:
    """Activation checkpointing of the decoder blocks, non-reentrant: the regulariser statistics
    leave the checkpointed blocks as side outputs, and the counter-based noise makes the
    recomputation draw the same masks.  False if the model cannot checkpoint."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    return True


def disable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def make_adamw(params, c):
    """AdamW; the fused kernel where available (one pass per tensor instead of several: the
    update touches every logit and both moments).  `optimizer: adamw-8bit`: torchao's AdamW8bit,
    the same decoupled-decay update computed in float32 with both moments stored as 8-bit codes
    and one float32 scale per block of 256 (2.03 bytes of state per logit instead of 8; tensors
    under 4096 values keep float32 moments)."""
    kwargs = dict(lr=c.lr, betas=(0.9, c.beta2), weight_decay=c.weight_decay)
    if getattr(c, "optimizer", "adamw") == "adamw-8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **kwargs)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this process holds: its shards' (DTensor, ZeRO), and for
    quantised moments their codes and scales (the tensors inside the subclass)."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: the local one

    def nbytes(t) -> int:
        if hasattr(t, "to_local"):
            t = t.to_local()
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass: count what it stores
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(nbytes(v) for state in inner.state.values() for v in state.values() if torch.is_tensor(v))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _chunk_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead) -> torch.Tensor:
    return F.cross_entropy(head.logits(hidden).float(), targets, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, ids: torch.Tensor, head: OutputHead, chunk: int) -> torch.Tensor:
    """lm_loss from the last hidden states, `chunk` tokens at a time: each chunk's logits are
    recomputed in backward (torch.utils.checkpoint) instead of kept, so the [tokens, vocab]
    logits never exist at once (Gemma-3's 262k vocabulary at 4096 tokens: 4.3 GB per float32
    copy, of which the full loss keeps about three).  The same value as lm_loss up to the
    order of the float sums."""
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    total = None
    for start in range(0, h.shape[0], chunk):
        part = checkpoint(_chunk_ce_sum, h[start:start + chunk], targets[start:start + chunk], head,
                          use_reentrant=False)
        total = part if total is None else total + part
    return total / h.shape[0]


def model_lm_loss(model, ids: torch.Tensor, head: Optional[OutputHead] = None, chunk: int = 0) -> torch.Tensor:
    """Mean next-token loss of `model` on `ids`: from its logits, or with `chunk` > 0 through
    `head` a chunk at a time."""
    if not chunk:
        return lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
    hidden = head.decoder(input_ids=ids, use_cache=False).last_hidden_state
    return chunked_lm_loss(hidden, ids, head, chunk)
