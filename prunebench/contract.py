"""The Pruner contract: what a method is, what it is given and what it returns.

A method subclasses `Pruner` (or the layer-wise engine's `LayerwisePruner`,
prunebench.engines.layerwise), declares its `Capabilities` and a `Config` dataclass, and turns
a model and a `PruneContext` into a `PruneReport`.  Names are looked up in prunebench.registry.
This module knows no engine and no method: it sits just above the sparsity patterns.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from prunebench.errors import UserError
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.typecheck import check_fields

# Statistics a layer-wise method can ask the engine for.
STATS_NONE = "none"
STATS_INPUT_NORM = "input_norm"  # per input column: mean over calibration tokens of x_j^2
STATS_HESSIAN = "hessian"  # X^T X / n_tokens (float32); its diagonal is the input norm
STATS_INPUT_MOMENTS = "input_moments"  # per input column: mean of x_j and of x_j^2 (so E[x_j], Var[x_j])
# A method needing several asks for them joined by "+" ("hessian+input_moments", see combine_stats).
STATS_SEPARATOR = "+"


def stats_kinds(statistics: str) -> frozenset:
    """The statistics a Capabilities.statistics string asks for ("none" asks for none)."""
    return frozenset(k for k in str(statistics).split(STATS_SEPARATOR) if k and k != STATS_NONE)


def combine_stats(*statistics: str) -> str:
    """One Capabilities.statistics string asking for everything the given ones ask for: what a
    method that runs another method (DSnoT over Wanda's or SparseGPT's mask) needs."""
    kinds = set().union(*(stats_kinds(s) for s in statistics))
    if STATS_INPUT_MOMENTS in kinds:
        kinds.discard(STATS_INPUT_NORM)  # the moments hold the mean squares the input norm is made of
    return STATS_SEPARATOR.join(sorted(kinds)) if kinds else STATS_NONE


@dataclass(frozen=True)
class Capabilities:
    patterns: tuple = ("unstructured", "nm")
    needs_calibration: bool = True
    needs_gradients: bool = False
    statistics: str = STATS_NONE
    # Whether the cell's seed can change the result: the calibration draw does, and a method
    # drawing random numbers without calibration says so here. None: exactly when it calibrates.
    # A seed-invariant method runs once per setting, at the grid's first seed.
    uses_seed: Optional[bool] = None
    # Whether the method may change the weights it keeps (a reconstruction, as SparseGPT and ADMM
    # do) rather than only zero some: the output checks then ask the kept weights to be finite
    # and bounded and record how far they moved; otherwise they must equal the dense ones.  None:
    # a layer-wise method updates them exactly when its prune_linear / prune_group returns new
    # weights (the engine, prunebench.engines.layerwise, observes it); any other method keeps them unchanged.
    updates_weights: Optional[bool] = None

    @property
    def seed_dependent(self) -> bool:
        return self.needs_calibration if self.uses_seed is None else bool(self.uses_seed)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "seed_dependent": self.seed_dependent}


@dataclass
class LayerStats:
    """Statistics of one linear layer's inputs over the calibration tokens, in float32."""

    n_tokens: int
    input_sq_mean: Optional[torch.Tensor] = None  # [in]: mean_t x_tj^2
    hessian: Optional[torch.Tensor] = None  # [in, in]: X^T X / n_tokens
    input_mean: Optional[torch.Tensor] = None  # [in]: mean_t x_tj (STATS_INPUT_MOMENTS)

    @property
    def input_norm(self) -> torch.Tensor:
        """||X_j||_2 up to a constant factor (sqrt of the mean square), as Wanda uses it."""
        sq = self.input_sq_mean if self.input_sq_mean is not None else torch.diagonal(self.hessian)
        return sq.clamp_min(0).sqrt()

    @property
    def input_var(self) -> torch.Tensor:
        """Var[x_j] over the calibration tokens (population variance): E[x_j^2] - E[x_j]^2."""
        if self.input_mean is None:
            raise ValueError("the input variance needs statistics='input_moments'")
        sq = self.input_sq_mean if self.input_sq_mean is not None else torch.diagonal(self.hessian)
        return (sq - self.input_mean * self.input_mean).clamp_min(0)


@dataclass
class LinearResult:
    """What a layer-wise method returns for one matrix: the mask, and new weights if it repairs them."""

    mask: torch.Tensor
    weight: Optional[torch.Tensor] = None
    warnings: list = field(default_factory=list)


@dataclass
class PruneContext:
    """Everything a pruner may use besides the model. Library code never sees CLI arguments."""

    sparsity: SparsitySpec
    calibration: Optional[torch.Tensor] = None  # [n, seqlen] token ids
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("prunebench"))
    registry: Any = None  # the registry module (prunebench.registry), so a method can build another method
    tokenizer: Any = None  # end-to-end methods draw their own training stream with it
    data_dir: Optional[str] = None
    calibration_dataset: str = "lee"
    work_dir: Optional[Path] = None  # where long jobs may checkpoint (kept across preemptions)
    eval_datasets: tuple = ()  # the cell's perplexity text: a streamed training text leaves it out
    extras: dict = field(default_factory=dict)


@dataclass
class PruneReport:
    warnings: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    # name -> bool keep-mask [out, in] of every pruned linear: what the output checks count as
    # pruned (both engines fill it; a method's own `prune` should).  None: the weights' zeros are
    # counted, the dense model's own zeros included, so a dense model with exact zeros may fail.
    masks: Optional[dict] = None
    # name -> SparsitySpec of each linear, when they differ from the cell's spec (a per-layer
    # allocation); the runner checks every linear against its own spec.
    layer_specs: Optional[dict] = None
    # Whether this run changed weights it kept, as observed by the framework (prune_layerwise sets
    # it: a LinearResult carried new weights); None: not observed.  See Capabilities.updates_weights and declares_weight_updates.
    updates_weights: Optional[bool] = None


def declares_weight_updates(capabilities: Capabilities, report: Optional[PruneReport]) -> bool:
    """What the method says it did to the weights it kept: its Capabilities' explicit answer, else
    what the run reported (a layer-wise method returned new weights), else unchanged."""
    if capabilities.updates_weights is not None:
        return bool(capabilities.updates_weights)
    return bool(getattr(report, "updates_weights", None))


class Pruner:
    """Base class of every method. Subclasses set `name`, `Config` and `capabilities`."""

    name: ClassVar[str] = ""
    display: ClassVar[str] = ""  # the name tables and plots print ("SparseGPT"); empty: the name
    # what kind of method it is, for the report's grouping: "layer-wise", "learned", "dense" or "other"
    kind: ClassVar[str] = "other"
    aliases: ClassVar[tuple] = ()
    Config: ClassVar[type]
    capabilities: ClassVar[Capabilities] = Capabilities()
    summary: ClassVar[str] = ""
    # Framework modules whose code decides this method's result (part of its identity).
    engine_modules: ClassVar[tuple] = ()
    # Whether a per-block sparsity allocation composes with it ("wanda+owl": the registry then
    # sets `.allocation` on the instance): only an engine that spends one, block by block, may
    # say so (the layer-wise engine's LayerwisePruner does).
    accepts_allocation: ClassVar[bool] = False
    # The settings the conformance suite (tests, `prunebench check`) runs this method at: small
    # enough to finish in seconds on a tiny model. {}: its defaults.
    test_config: ClassVar[dict] = {}
    # Its measured cost, which the GPU plan (prunebench/run/plan.py) scales FLOPs by: a one-shot
    # method's pruning time over floor-1 (every block run twice over the calibration tokens), a
    # learned method's training step over a dense forward+backward of the same tokens.  None:
    # not measured here (the plan then says which measured figure it assumed).
    cost_ratio: ClassVar[Optional[float]] = None

    def __init__(self, config=None, **overrides):
        self.config = make_config(self.Config, config, overrides)

    def check_spec(self, spec: SparsitySpec) -> None:
        if spec.pattern not in self.capabilities.patterns:
            raise UserError(f"method {self.name!r} does not support the {spec.pattern_name} pattern",
                            hint=f"it supports: {', '.join(self.capabilities.patterns)}")
        allocation = getattr(self, "allocation", None)
        if allocation is not None:  # 'wanda+owl': the allocation must support the pattern too
            allocation.check_spec(spec)

    def uses_methods(self) -> tuple:
        """Registered methods this configuration calls (e.g. LEAP's Wanda prior): their code is
        part of this method's identity."""
        return ()

    def prune(self, model, ctx: PruneContext) -> PruneReport:
        raise NotImplementedError


def make_config(config_cls, config=None, overrides=None):
    """Build a config dataclass from a dict or instance; unknown keys and wrong types are errors."""
    overrides = dict(overrides or {})
    if config is None:
        base = {}
    elif dataclasses.is_dataclass(config):
        base = dataclasses.asdict(config)
    elif isinstance(config, dict):
        base = dict(config)
    else:
        raise UserError(f"a method config must be a mapping, got {type(config).__name__}: {config!r}"[:200],
                        hint="write config: {option: value, ...}")
    base.update(overrides)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(map(str, base)) - known)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for {config_cls.__qualname__}",
                        hint=f"known options: {', '.join(sorted(known)) or 'none'}")
    check_fields(config_cls, base, config_cls.__qualname__)
    try:
        return config_cls(**base)
    except (TypeError, ValueError) as exc:  # a config's own __post_init__ validation
        if isinstance(exc, UserError):
            raise
        raise UserError(f"invalid {config_cls.__qualname__}: {exc}") from None


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
