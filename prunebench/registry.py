"""The Pruner contract and the method registry.

Built-in methods live in `prunebench.methods` (the repository's methods/ folder) and register
themselves with `@register`.  Third-party methods come from the entry-point group
`prunebench.methods` or from a file passed with `--plugin`.  Everything is imported lazily, on
the first lookup, so importing prunebench has no side effects.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from .errors import UserError
from .sparsity import SparsitySpec

ENTRY_POINT_GROUP = "prunebench.methods"

# Statistics a layer-wise method can ask the engine for.
STATS_NONE = "none"
STATS_INPUT_NORM = "input_norm"  # per input column: mean over calibration tokens of x_j^2
STATS_HESSIAN = "hessian"  # X^T X / n_tokens (float32); its diagonal is the input norm


@dataclass(frozen=True)
class Capabilities:
    patterns: tuple = ("unstructured", "nm")
    needs_calibration: bool = True
    needs_gradients: bool = False
    statistics: str = STATS_NONE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LayerStats:
    """Statistics of one linear layer's inputs over the calibration tokens, in float32."""

    n_tokens: int
    input_sq_mean: Optional[torch.Tensor] = None  # [in]: mean_t x_tj^2
    hessian: Optional[torch.Tensor] = None  # [in, in]: X^T X / n_tokens

    @property
    def input_norm(self) -> torch.Tensor:
        """||X_j||_2 up to a constant factor (sqrt of the mean square), as Wanda uses it."""
        sq = self.input_sq_mean if self.input_sq_mean is not None else torch.diagonal(self.hessian)
        return sq.clamp_min(0).sqrt()


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
    registry: Any = None  # the registry module, so a method can build another method
    tokenizer: Any = None  # end-to-end methods draw their own training stream with it
    data_dir: Optional[str] = None
    calibration_dataset: str = "lee"
    work_dir: Optional[Path] = None  # where long jobs may checkpoint (kept across preemptions)
    extras: dict = field(default_factory=dict)


@dataclass
class PruneReport:
    warnings: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    masks: Optional[dict] = None  # name -> bool mask, when the method keeps them


class Pruner:
    """Base class of every method. Subclasses set `name`, `Config` and `capabilities`."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()
    Config: ClassVar[type]
    capabilities: ClassVar[Capabilities] = Capabilities()
    summary: ClassVar[str] = ""

    def __init__(self, config=None, **overrides):
        self.config = make_config(self.Config, config, overrides)

    def check_spec(self, spec: SparsitySpec) -> None:
        if spec.pattern not in self.capabilities.patterns:
            raise UserError(f"method {self.name!r} does not support the {spec.pattern_name} pattern",
                            hint=f"it supports: {', '.join(self.capabilities.patterns)}")

    def prune(self, model, ctx: PruneContext) -> PruneReport:
        raise NotImplementedError


class LayerwisePruner(Pruner):
    """A method that prunes one linear at a time from statistics of its inputs.

    The shared engine (prunebench.layerwise) owns the block loop, the hooks and the statistics;
    the method supplies only `prune_linear`.
    """

    default_scope: ClassVar[str] = "row"  # for unstructured specs that do not name a scope

    def prune_linear(self, weight: torch.Tensor, stats: LayerStats, spec: SparsitySpec,
                     ctx: PruneContext) -> LinearResult:
        """weight: float32 [out, in] copy. Return the keep-mask and optionally new weights."""
        raise NotImplementedError

    def prune(self, model, ctx: PruneContext) -> PruneReport:
        from .layerwise import prune_layerwise

        self.check_spec(ctx.sparsity)
        return prune_layerwise(model, self, ctx)


def make_config(config_cls, config=None, overrides=None):
    """Build a config dataclass from a dict or instance; unknown keys are an error."""
    overrides = dict(overrides or {})
    if config is None:
        base = {}
    elif dataclasses.is_dataclass(config):
        base = dataclasses.asdict(config)
    elif isinstance(config, dict):
        base = dict(config)
    else:
        raise TypeError(f"config must be a dict or {config_cls.__name__}, got {type(config).__name__}")
    base.update(overrides)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for {config_cls.__qualname__}",
                        hint=f"known options: {', '.join(sorted(known)) or 'none'}")
    return config_cls(**base)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})


# ---------------------------------------------------------------------------------------------
# The registry

_METHODS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
_loaded = {"builtins": False, "entry_points": False}


def register(cls=None, *, name: str | None = None, aliases: tuple = ()):
    """Class decorator: `@register` or `@register(name="x", aliases=("y",))`."""

    def wrap(klass):
        key = (name or klass.name or "").lower()
        if not key:
            raise ValueError(f"{klass.__name__} needs a name")
        if not issubclass(klass, Pruner):
            raise TypeError(f"{klass.__name__} must subclass prunebench.registry.Pruner")
        existing = _METHODS.get(key)
        if existing is not None and existing.__qualname__ != klass.__qualname__:
            raise ValueError(f"method name {key!r} is already taken by {existing.__module__}.{existing.__qualname__}")
        klass.name = key
        _METHODS[key] = klass
        for alias in tuple(aliases) + tuple(getattr(klass, "aliases", ())):
            _ALIASES[alias.lower()] = key
        return klass

    return wrap(cls) if cls is not None else wrap


def _load_builtins() -> None:
    if _loaded["builtins"]:
        return
    _loaded["builtins"] = True
    import prunebench.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"prunebench.methods.{info.name}")


def _load_entry_points() -> None:
    if _loaded["entry_points"]:
        return
    _loaded["entry_points"] = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # a module that registers on import, or a Pruner class
        if isinstance(obj, type) and issubclass(obj, Pruner) and obj.name not in _METHODS:
            register(obj, name=obj.name or ep.name)


def load_plugin(path) -> list[str]:
    """Import a Python file that registers methods; returns the names it added."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file {str(path)!r} does not exist", hint="pass --plugin path/to/method.py")
    before = set(_METHODS)
    mod_name = f"prunebench_plugin_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return sorted(set(_METHODS) - before)


def available() -> list[str]:
    _load_builtins()
    _load_entry_points()
    return sorted(_METHODS)


def resolve(name: str) -> str:
    key = name.strip().lower()
    available()
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        raise UserError(f"unknown method {name!r}", hint=f"known methods: {', '.join(available())}")
    return key


def get(name: str) -> type:
    return _METHODS[resolve(name)]


def create(name: str, config=None, **overrides) -> Pruner:
    return get(name)(config, **overrides)


def describe() -> list[dict]:
    """One entry per method: name, aliases, summary, capabilities, config defaults."""
    out = []
    for key in available():
        cls = _METHODS[key]
        defaults = {}
        for f in dataclasses.fields(cls.Config):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                defaults[f.name] = f.default_factory()  # type: ignore[misc]
        aliases = sorted(a for a, k in _ALIASES.items() if k == key)
        out.append({"name": key, "aliases": aliases, "summary": cls.summary,
                    "capabilities": cls.capabilities.to_dict(), "defaults": defaults})
    return out
