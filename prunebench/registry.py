"""The Pruner contract and the method registry.

Built-in methods live in `prunebench.methods` (the repository's methods/ folder) and register
themselves with `@register`.  Third-party methods come from the entry-point group
`prunebench.methods` or from a file passed with `--plugin`.  Everything is imported lazily, on
the first lookup, so importing prunebench has no side effects.
"""
from __future__ import annotations

import dataclasses
import hashlib
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
from .typecheck import check_fields
from prunebench.sparsity.patterns import SparsitySpec

ENTRY_POINT_GROUP = "prunebench.methods"
log = logging.getLogger("prunebench")

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
    registry: Any = None  # the registry module, so a method can build another method
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


class LayerwisePruner(Pruner):
    """A method that prunes one linear at a time from statistics of its inputs.

    The shared engine (prunebench.engines.layerwise) owns the block loop, the hooks and the statistics;
    the method supplies only `prune_linear`.
    """

    kind: ClassVar[str] = "layer-wise"
    default_scope: ClassVar[str] = "row"  # for unstructured specs that do not name a scope
    engine_modules: ClassVar[tuple] = ("prunebench.engines.layerwise",)

    def prune_linear(self, weight: torch.Tensor, stats: LayerStats, spec: SparsitySpec,
                     ctx: PruneContext) -> LinearResult:
        """weight: float32 [out, in] copy. Return the keep-mask and optionally new weights."""
        raise NotImplementedError

    def prune_group(self, weights: dict, stats: LayerStats, spec: SparsitySpec, ctx: PruneContext) -> dict:
        """Linears of one block that read the same input (q/k/v, gate/up) and so share `stats`.

        weights: name -> float32 [out, in] copy.  Returns name -> LinearResult.  The default
        prunes them one by one; a method that can share work across the group (one Hessian
        factorisation) overrides it.
        """
        return {name: self.prune_linear(w, stats, spec, ctx) for name, w in weights.items()}

    def prune(self, model, ctx: PruneContext) -> PruneReport:
        from prunebench.engines.layerwise import prune_layerwise

        self.check_spec(ctx.sparsity)
        return prune_layerwise(model, self, ctx)  # it also reports whether new weights were returned


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


# ---------------------------------------------------------------------------------------------
# The registry

_METHODS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
_ORIGINS: dict[str, dict] = {}  # name -> {"kind": builtin | plugin | entry_point, ...}
_loaded = {"builtins": False, "entry_points": False}
# Set while a plugin file or entry point is being imported, so @register knows where a class came from.
_importing: dict = {"origin": None}
# Built-in names the user explicitly allowed a plugin to replace (--replace NAME).
_replaceable: set = set()


def allow_replacing(names) -> None:
    """Let a plugin take these built-in names: the user asked for it explicitly."""
    _replaceable.update(n.strip().lower() for n in names if n.strip())


def _same_class(a: type, b: type) -> bool:
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def register(cls=None, *, name: str | None = None, aliases: tuple = ()):
    """Class decorator: `@register` or `@register(name="x", aliases=("y",))`.

    A name (or alias) that another method already holds is refused, so a plugin can never pass
    its records off as a built-in's; the user may allow it for one name with `--replace NAME`,
    and the records then carry the plugin's identity.
    """

    def wrap(klass):
        key = (name or klass.name or "").lower()
        if not key:
            raise UserError(f"{klass.__name__} needs a name", hint="set name = \"...\" on the class or @register(name=...)")
        if not issubclass(klass, Pruner):
            raise UserError(f"{klass.__name__} must subclass prunebench.registry.Pruner")
        origin = dict(_importing["origin"] or {"kind": "builtin"})
        _load_builtins_for(origin)
        existing = _METHODS.get(key)
        replaces = False
        if existing is not None and not _same_class(existing, klass):
            if key in _replaceable and origin["kind"] != "builtin":
                replaces = _ORIGINS.get(key, {}).get("kind") == "builtin"
                log.warning("method %r: the plugin %s replaces %s.%s (--replace)", key, origin.get("file"),
                            existing.__module__, existing.__qualname__)
            else:
                raise UserError(f"method name {key!r} is already taken by {existing.__module__}.{existing.__qualname__}",
                                hint=f"give the plugin another name, or pass --replace {key} to use it instead")
        all_aliases = [a.lower() for a in tuple(aliases) + tuple(getattr(klass, "aliases", ()))]
        for alias in all_aliases:
            holder = _ALIASES.get(alias, alias if alias in _METHODS else None)
            if holder is not None and holder != key and not (holder in _replaceable and origin["kind"] != "builtin"):
                raise UserError(f"alias {alias!r} of method {key!r} is already taken by method {holder!r}",
                                hint="choose another alias")
        klass.name = key
        _METHODS[key] = klass
        _ORIGINS[key] = {**origin, "replaces_builtin": replaces or _ORIGINS.get(key, {}).get("replaces_builtin", False)}
        for alias in all_aliases:
            _ALIASES[alias] = key
        return klass

    return wrap(cls) if cls is not None else wrap


def _load_builtins_for(origin: dict) -> None:
    # A plugin registers only after the built-ins are known, so a clash is always detected.
    if origin["kind"] != "builtin":
        _load_builtins()


def origin(name: str) -> dict:
    return dict(_ORIGINS.get(resolve(name), {"kind": "builtin"}))


def _load_builtins() -> None:
    if _loaded["builtins"]:
        return
    _loaded["builtins"] = True
    # Found by name, like entry points: the registry sits below the methods it lists.
    pkg = importlib.import_module("prunebench.methods")

    saved, _importing["origin"] = _importing["origin"], None
    try:
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"prunebench.methods.{info.name}")
    finally:
        _importing["origin"] = saved


def _load_entry_points() -> None:
    if _loaded["entry_points"]:
        return
    _loaded["entry_points"] = True
    _load_builtins()
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        _importing["origin"] = {"kind": "entry_point", "package": getattr(dist, "name", None),
                                "package_version": getattr(dist, "version", None), "entry_point": getattr(ep, "value", None)}
        try:
            obj = ep.load()  # a module that registers on import, or a Pruner class
            if isinstance(obj, type) and issubclass(obj, Pruner) and not any(
                    _same_class(obj, c) for c in _METHODS.values()):
                register(obj, name=obj.name or ep.name)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"entry point {ep.name!r} ({getattr(ep, 'value', '?')}) of group {ENTRY_POINT_GROUP} failed to load: "
                            f"{type(exc).__name__}: {exc}"[:300], hint="fix or uninstall that package") from None
        finally:
            _importing["origin"] = None


def load_plugin(path) -> list[str]:
    """Import a Python file that registers methods; returns the names it added or replaced.

    Errors in the file (syntax, import, anything raised at import time) are one UserError that
    names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file {str(path)!r} does not exist", hint="pass --plugin path/to/method.py")
    _load_builtins()
    before = {k: v for k, v in _METHODS.items()}
    resolved = path.resolve()
    mod_name = f"prunebench_plugin_{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise UserError(f"plugin {str(path)!r} is not a Python file", hint="pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    _importing["origin"] = {"kind": "plugin", "file": str(resolved)}
    try:
        spec.loader.exec_module(module)
    except UserError as exc:
        sys.modules.pop(mod_name, None)
        raise UserError(f"plugin {path}: {exc.message}", hint=exc.hint) from None
    except SyntaxError as exc:
        sys.modules.pop(mod_name, None)
        raise UserError(f"plugin {path}, line {exc.lineno}: syntax error: {exc.msg}",
                        hint="fix the file; `python -m py_compile FILE` shows the same") from None
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        line = _line_in(exc, resolved)
        where = f"plugin {path}, line {line}" if line else f"plugin {path}"
        raise UserError(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                        hint="the file must import and register without errors") from None
    finally:
        _importing["origin"] = None
    added = sorted(k for k, v in _METHODS.items() if before.get(k) is not v)
    if not added:  # a forgotten @register would otherwise pass unnoticed until its name is unknown
        sys.modules.pop(mod_name, None)
        raise UserError(f"plugin {path} registers no method",
                        hint="decorate a Pruner subclass with @register (from prunebench.registry import register)")
    return added


def check_replacements(names) -> None:
    """Every --replace NAME must name a method a plugin registered: otherwise it replaces nothing
    and the user's intent (run the plugin's method under that name) silently did not happen."""
    if names:
        available()  # installed entry points may replace a name too
    for name in names:
        key = name.strip().lower()
        if not key:
            raise UserError("--replace needs a method name", hint="e.g. --plugin my_wanda.py --replace wanda")
        if key not in _METHODS or _ORIGINS.get(key, {}).get("kind", "builtin") == "builtin":
            raise UserError(f"--replace {name}: no --plugin registers a method of that name",
                            hint=f"pass the --plugin file that registers {key!r}, or drop --replace {name}")


def replaceable() -> tuple:
    """The names --replace allowed in this process, for a worker process to allow them too."""
    return tuple(sorted(_replaceable))


def _line_in(exc: BaseException, file: Path) -> int | None:
    """The last traceback line that lies in `file` (where the plugin's own code failed)."""
    import traceback

    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == file:
            line = frame.lineno
    return line


def available() -> list[str]:
    _load_builtins()
    _load_entry_points()
    return sorted(_METHODS)


ALLOCATION_SEPARATOR = "+"  # "wanda+owl": a layer-wise method with a per-block sparsity allocation


def split_name(name: str) -> tuple:
    """'wanda+owl' -> ('wanda', 'owl'); 'wanda' -> ('wanda', None)."""
    base, sep, allocation = name.partition(ALLOCATION_SEPARATOR)
    return base.strip(), (allocation.strip() if sep else None)


def resolve(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"a method name must be a non-empty string, got {name!r}"[:200],
                        hint=f"known methods: {', '.join(available())}")
    base, allocation = split_name(name)
    if allocation is not None:
        from prunebench.engines import allocation as allocations

        key = resolve(base)
        if not issubclass(_METHODS[key], LayerwisePruner):
            raise UserError(f"{name!r}: a sparsity allocation composes with layer-wise methods only, and "
                            f"{key!r} is not one", hint="e.g. wanda+owl, sparsegpt+alphapruning")
        return f"{key}{ALLOCATION_SEPARATOR}{allocations.resolve(allocation)}"
    key = name.strip().lower()
    available()
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        raise UserError(f"unknown method {name!r}", hint=f"known methods: {', '.join(available())}")
    return key


def get(name: str) -> type:
    """The method class (for 'wanda+owl' the layer-wise method's)."""
    return _METHODS[split_name(resolve(name))[0]]


def create(name: str, config=None, **overrides) -> Pruner:
    """An instance of the method.  For 'method+allocation' the config may hold the allocation's
    own options under the key "allocation"; the instance then carries `.allocation`."""
    key = resolve(name)
    base, allocation = split_name(key)
    if allocation is None:
        return _METHODS[key](config, **overrides)
    from prunebench.engines import allocation as allocations

    if config is not None and not isinstance(config, dict):
        raise UserError(f"method {key!r}: config must be a mapping", hint="write config: {option: value, allocation: {...}}")
    config = dict(config or {})
    config.update(overrides)
    allocation_config = config.pop("allocation", None) or {}
    pruner = _METHODS[base](config)
    pruner.allocation = allocations.create(allocation, allocation_config)
    pruner.name = key
    if pruner.allocation.statistics != STATS_NONE and not pruner.capabilities.needs_calibration:
        pruner.capabilities = dataclasses.replace(pruner.capabilities, needs_calibration=True)
    return pruner


def resolved_config(pruner: Pruner) -> dict:
    """Every hyperparameter the pruner will use (with its allocation's under "allocation")."""
    out = config_to_dict(pruner.config)
    allocation = getattr(pruner, "allocation", None)
    if allocation is not None:
        out["allocation"] = config_to_dict(allocation.config)
    return out


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
        entry = {"name": key, "display": display_name(key), "kind": cls.kind, "aliases": aliases,
                 "summary": cls.summary, "origin": origin(key), "capabilities": cls.capabilities.to_dict(),
                 "defaults": defaults}
        presets = preset_values(cls)
        if presets:
            entry["presets"] = presets
        out.append(entry)
    return out


def preset_values(cls) -> dict:
    """{preset: every setting it resolves to} for a method whose Config has PRESETS (the learned
    methods leave their fields None and let the preset fill them, so the defaults alone say
    nothing); {} for one without."""
    presets = getattr(cls.Config, "PRESETS", None)
    if not isinstance(presets, dict) or "preset" not in {f.name for f in dataclasses.fields(cls.Config)}:
        return {}
    out = {}
    for name in presets:
        try:
            values = config_to_dict(cls.Config(preset=name))
        except UserError as exc:  # a preset this install cannot build (a missing extra): say so, list the rest
            out[name] = {"error": str(exc)}
            continue
        values.pop("preset", None)
        out[name] = values
    return out


def display_name(name: str) -> str:
    """The name a method's class gives for tables and plots ('SparseGPT'); the registry name for
    a method this install does not have (an old record) or one that gives none."""
    try:
        cls = get(name)
    except Exception:
        return name
    return cls.display or cls.name


def method_kind(name: str) -> str:
    """'layer-wise', 'learned', 'dense' or 'other' (unknown names: 'other')."""
    try:
        return get(split_name(name)[0]).kind
    except Exception:
        return "other"
