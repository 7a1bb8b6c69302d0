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
checkpoint and resume, the held-out curve of the hard mask, and the progress bar.  Its parts:
masklearn_config (the shared settings and schedules), masklearn_data (the training text and each
step's batch), masklearn_gates (the noise and the masked linears), masklearn_loss (the LM loss and
activation checkpointing), masklearn_optim (the optimizer) and masklearn_checkpoint (save, resume).

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
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import nn

from prunebench import registry
from prunebench.engines.distributed import DataParallel, LogitHolder
from prunebench.engines.masklearn_checkpoint import ResumableTraining, Unresumable, remove_state
from prunebench.engines.masklearn_config import lr_factor
from prunebench.engines.masklearn_data import StreamedBatches, split_training_windows, step_batch
from prunebench.engines.masklearn_gates import MaskedLinears
from prunebench.engines.masklearn_loss import disable_checkpointing, enable_checkpointing, model_lm_loss
from prunebench.engines.masklearn_optim import make_adamw, optimizer_state_bytes
from prunebench.errors import UserError
from prunebench.modeling.models import all_prunable, resolve_dtype, restore_prunable, snapshot_prunable, weight_matrix
from prunebench.modeling.output_head import OutputHead
from prunebench.progress import progress_bar
from prunebench.contract import Pruner, PruneReport
from prunebench.sparsity.patterns import SparsitySpec


# The engine's files (this one and the parts it is built from): all of them are part of every learned
# method's identity (prunebench.provenance.identity hashes each file it names).
ENGINE_MODULES = ("prunebench.engines.masklearn", "prunebench.engines.masklearn_checkpoint",
                  "prunebench.engines.masklearn_config", "prunebench.engines.masklearn_data",
                  "prunebench.engines.masklearn_gates", "prunebench.engines.masklearn_loss",
                  "prunebench.engines.masklearn_optim",
                  # the training batches and, across processes, the gradient reduction
                  "prunebench.data.stream", "prunebench.engines.distributed")


def mask_sparsity(masks: dict) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


@dataclass
class _TrainingText:
    """A run's text: its training windows (a tensor, or StreamedBatches read on the fly) and the
    held-out ones."""
    dataset: str
    train: object
    heldout: torch.Tensor
    fingerprint: str
    streamed: bool


@dataclass
class _Run:
    """What the steps of one training run share (built by LearnedMaskPruner._train)."""
    model: nn.Module
    text: _TrainingText
    micros: list  # this process's global micro-batch indices
    micro_size: int  # sequences per micro-batch
    dp: DataParallel
    device: torch.device
    holder: LogitHolder
    step_module: nn.Module  # the logits wrapped for data parallelism (DDP, FSDP, or as they are)
    params: list
    optimizer: object
    scheduler: object
    patch: MaskedLinears
    head: Optional[OutputHead]
    seed: int
    who: str


@contextmanager
def frozen_for_training(model, gradient_checkpointing: bool):
    """Freeze everything; only the logits learn.  Restore the flags afterwards.  With
    gradient_checkpointing (where the model can), block activations are recomputed in backward."""
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    checkpointing = bool(gradient_checkpointing) and enable_checkpointing(model)
    if checkpointing:
        model.train()  # transformers checkpoints only in training mode
    else:
        model.eval()  # no dropout: the only randomness is the mask noise
    try:
        yield
    finally:
        if checkpointing:
            disable_checkpointing(model)
        model.train(was_training)
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# The engine

class LearnedMaskPruner(Pruner, ResumableTraining):
    """Base of every learned-mask method; `prune` runs the shared training loop."""

    # every file of the engine decides what a learned method computes
    engine_modules: ClassVar[tuple] = ENGINE_MODULES
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
        reg = registry if ctx.registry is None else ctx.registry
        snapshot = snapshot_prunable(model)
        prior = reg.create(method, config or {})
        try:
            prior.prune(model, dataclasses.replace(ctx, sparsity=spec, progress=False))
            keep = {name: (weight_matrix(m).detach() != 0) for name, m in modules.items()}
        finally:
            restore_prunable(model, snapshot)
        return keep

    def training_windows(self, ctx):
        """(dataset, train windows, held-out windows, stream fingerprint) of this run
        (prunebench.engines.masklearn_data.split_training_windows)."""
        return split_training_windows(self.config, ctx, self.display or self.name)

    def batch(self, train, step: int, seed: int) -> torch.Tensor:
        """The sequences of optimizer step `step` (prunebench.engines.masklearn_data.step_batch)."""
        return step_batch(train, step, seed, self.config.batch_size)

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
            except Unresumable as exc:  # a checkpoint that does not fit the run: never trusted
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
        micro_size = c.batch_size // c.grad_accum
        text = self._training_text(ctx, modules, dp, micros, report)

        state_path = Path(ctx.work_dir) / self.checkpoint_file if ctx.work_dir and c.checkpoint_every else None
        run_key = self._run_key(ctx, modules, text.fingerprint)
        resumed = None if refused else self._load_state(state_path, run_key, report, dp, layers=list(modules))
        holder = self._logit_holder(model, modules, ctx, report, resumed, device, logits_dtype)
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
            curves, start_step = self._resume(resumed, holder, optimizer, scheduler, modules, spec, dp, report)

        with frozen_for_training(model, c.gradient_checkpointing):
            patch = MaskedLinears(modules, holder, self)
            patch.seed = ctx.seed
            head = OutputHead.of(model, hint="set loss_chunk: 0 to compute the loss from the model's own logits") \
                if c.loss_chunk else None
            run = _Run(model=model, text=text, micros=micros, micro_size=micro_size, dp=dp, device=device,
                       holder=holder, step_module=step_module, params=params, optimizer=optimizer,
                       scheduler=scheduler, patch=patch, head=head, seed=ctx.seed, who=who)
            bar = progress_bar(total=c.steps, desc=f"{self.name} {spec.label}", enabled=ctx.progress, unit="step")
            bar.update(start_step)
            try:
                if resumed is None:
                    self._heldout(model, patch, text.heldout, spec, 0, curves, micro_size, device, dp, head=head)
                    if curves.get("heldout_loss"):
                        report.stats["prior_heldout_loss"] = curves["heldout_loss"][0]
                        report.stats["prior_heldout_ppl"] = curves["heldout_ppl"][0]
                for step in range(start_step, c.steps):
                    sched = self.schedule(step)
                    logged = self._gradients(run, step, sched)
                    self._update(run, step, sched, logged)
                    self._log_step(curves, bar, step, logged, sched)
                    done = step + 1
                    if c.heldout_every and done % c.heldout_every == 0 and done < c.steps:
                        self._heldout(model, patch, text.heldout, spec, done, curves, micro_size, device, dp,
                                      head=head)
                    if state_path is not None and done % c.checkpoint_every == 0 and done < c.steps:
                        self._checkpoint(dp, state_path, run_key, holder, optimizer, scheduler, done, curves)
                patch.mode = "off"
                masks = self.hard_masks(holder.full(), spec)
                self._heldout(model, patch, text.heldout, spec, c.steps, curves, micro_size, device, dp,
                              masks=masks, head=head)
            finally:
                bar.close()
                patch.remove()

        # Apply the hard mask to the weights in place: the runner measures sparsity from them.
        with torch.no_grad():
            for name, module in modules.items():
                weight_matrix(module).mul_(masks[name].to(module.weight.dtype))
        achieved = mask_sparsity(masks)
        # the output checks count these masks, not the weights' zeros (the dense model has some)
        report.masks = {name: m.to("cpu") for name, m in masks.items()}
        self.finish(holder.full(), masks, spec, report)
        self._result_stats(report, run, curves, masks, achieved, start_step, t_start)
        dp.barrier()  # every process is past its last read of the checkpoint
        if dp.is_main and state_path is not None:
            remove_state(state_path)  # the finished result is in the weights; a stale state must not resume
        del run, optimizer, params, holder, step_module
        return report

    # -- the steps of a run -------------------------------------------------------------------

    def _training_text(self, ctx, modules, dp, micros, report) -> _TrainingText:
        """The run's training and held-out windows, their statistics in the report, and the check
        that the text holds one batch (a warning where the steps read it more than once)."""
        c = self.config
        who = self.display or self.name
        dataset, train, heldout, fingerprint = self.training_windows(ctx)
        streamed = isinstance(train, StreamedBatches)
        report.stats.update(dataset=dataset, heldout_windows=len(heldout), stream_fingerprint=fingerprint,
                            n_masked=sum(m.weight.numel() for m in modules.values()))
        if dp.active:
            report.stats.update(processes=dp.world, micro_batches_per_process=len(micros))
        if not streamed:
            report.stats["train_windows"] = len(train)
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
        return _TrainingText(dataset, train, heldout, fingerprint, streamed)

    def _logit_holder(self, model, modules, ctx, report, resumed, device, logits_dtype) -> LogitHolder:
        """The trained logits: the method's prior on a fresh run, the checkpoint's on a resumed one
        (sharded: placeholders of the full shapes, the shards are read in _resume)."""
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
        return LogitHolder({layer: {key: nn.Parameter(t.to(device=device, dtype=logits_dtype),
                                                      requires_grad=key not in frozen)
                                    for key, t in initial[layer].items()} for layer in modules})

    def _resume(self, resumed, holder, optimizer, scheduler, modules, spec, dp, report) -> tuple:
        """(curves, first step) of a resumed run, its state loaded: every process its logit shards
        (sharded), its moments or its share of them, the schedule; each checked against what it
        goes into (Unresumable: start afresh)."""
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
        return curves, start_step

    def _gradients(self, run: _Run, step: int, sched: dict) -> dict:
        """Forward and backward of this process's micro-batches of step `step`: the logits'
        gradients accumulated, and the step's loss terms summed over every process."""
        c, patch, text, dp = self.config, run.patch, run.text, run.dp
        train, micros, micro_size = text.train, run.micros, run.micro_size
        patch.mode, patch.step, patch.sched = "soft", step, sched
        run.optimizer.zero_grad(set_to_none=True)
        batch_ids = None if text.streamed else self.batch(train, step, run.seed)
        logged = {"loss": 0.0, "ce": 0.0}
        for micro in micros:  # global micro-batch indices: the data and the noise follow them
            patch.micro = micro
            if text.streamed:
                ids = train.take(step * c.batch_size + micro * micro_size, micro_size).to(run.device)
            else:
                ids = batch_ids[micro * micro_size:(micro + 1) * micro_size].to(run.device)
            patch.stats.clear()
            with dp.no_sync(run.step_module, last_micro=micro == micros[-1]):
                ce = run.step_module(lambda: model_lm_loss(run.model, ids, run.head, c.loss_chunk))
                terms, metrics = self.regularisers(patch.stats, sched)
                loss = ce
                for term in terms:
                    loss = loss + term
                finite = bool(torch.isfinite(loss))
                if dp.any_true(not finite):  # every process stops, not only the one that saw it
                    where = (f"micro-batch {micro}; ce {ce.item()}" if not finite
                             else "on another process")
                    raise FloatingPointError(f"{run.who}: non-finite loss {loss.item()} at step {step} ({where})")
                # / this process's share: DDP (FSDP) then averages over the processes, so
                # the gradient is the mean over all grad_accum micro-batches
                (loss / len(micros)).backward()
            logged["loss"] += loss.item() / c.grad_accum
            logged["ce"] += ce.item() / c.grad_accum
            for name, value in metrics.items():
                logged[name] = logged.get(name, 0.0) + value / c.grad_accum
        del loss, ce, terms
        patch.stats.clear()
        return dp.sum_floats(logged)

    def _update(self, run: _Run, step: int, sched: dict, logged: dict) -> None:
        """The optimizer step on the accumulated gradients (clipped first: the norm goes into
        `logged`), the method's after_step, then the lr schedule's step."""
        c, holder = self.config, run.holder
        if c.grad_clip:
            logged["grad_norm"] = run.dp.clip_grad_norm(run.params, c.grad_clip)
            if not math.isfinite(logged["grad_norm"]):
                raise FloatingPointError(f"{run.who}: non-finite gradient norm at step {step}")
        run.optimizer.step()
        with torch.no_grad():
            self.after_step({name: dict(unit.tensors) for name, unit in zip(holder.names, holder.layers)},
                            step, sched)
        run.scheduler.step()

    def _log_step(self, curves: dict, bar, step: int, logged: dict, sched: dict) -> None:
        """The step's row of the training curves, and the progress bar."""
        row = {"step": step, **logged, **{k: sched[k] for k in self.logged_schedule}}
        for name, value in row.items():
            curves.setdefault(name, []).append(round(value, 6) if isinstance(value, float) else value)
        bar.update(1)
        bar.set_postfix(loss=f"{logged['loss']:.3f}",
                        **{k: f"{v:.3g}" for k, v in logged.items() if k not in ("loss", "ce")},
                        **{k: f"{sched[k]:.3g}" for k in self.logged_schedule})

    def _result_stats(self, report, run: _Run, curves, masks, achieved, start_step, t_start) -> None:
        """What the report says of the finished run: curves, sparsity, tokens, time, memory, the
        final held-out loss and, streamed, what the stream served."""
        c, text = self.config, run.text
        report.stats.update(curves=curves, achieved_sparsity=achieved, steps=c.steps,
                            tokens_seen=(c.steps - start_step) * c.batch_size * c.seqlen,
                            train_s=round(time.perf_counter() - t_start, 3),
                            logits_bytes=sum(p.numel() * p.element_size() for p in run.holder.parameters()),
                            optimizer_state_bytes_per_process=optimizer_state_bytes(run.optimizer),
                            per_layer_sparsity={name: round(1.0 - m.float().mean().item(), 6)
                                                for name, m in masks.items()})
        if curves.get("heldout_loss"):
            report.stats["heldout_loss"] = curves["heldout_loss"][-1]
            report.stats["heldout_ppl"] = curves["heldout_ppl"][-1]
        if text.streamed:
            report.stats["stream"] = text.train.stats
            report.stats["stream_repeats"] = text.train.stats["repeats"]
            if text.train.stats["repeats"]:
                report.warnings.append(f"{run.who}: the {text.dataset} stream ran out and was read "
                                       f"{text.train.stats['passes']} times (allow_stream_repeats)")

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
