"""What a learned-mask run is told: the settings every learned method shares (a method's Config
subclasses MaskTrainingConfig and adds its own fields and presets) and the schedules, pure
functions of the optimizer step, that its temperatures, scales and learning rate follow."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

from prunebench.errors import UserError
from prunebench.modeling.models import resolve_dtype

LR_SCHEDULES = ("cosine", "constant")
# adamw: torch's AdamW, the moments in the logits' dtype (the authors' Hugging Face trainer);
# adamw-8bit: torchao's AdamW8bit, the same update with both moments stored 8-bit, block-wise.
OPTIMIZERS = ("adamw", "adamw-8bit")


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
