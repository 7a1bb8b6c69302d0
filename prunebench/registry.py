"""Names for plugin classes: one generic `Registry`, and the method registry everyone looks up.

Two registries: `METHODS` (Pruner classes) and `ALLOCATIONS` (per-block sparsity allocations,
whose base class lives with the engine that spends them, prunebench.engines.allocation).  The
built-ins live in `prunebench.methods` (the repository's methods/ folder) and register
themselves; third-party methods come from the entry-point group `prunebench.methods` or from a
file passed with `--plugin` (prunebench.plugins).  Everything is imported lazily, on the first
lookup, so importing prunebench has no side effects.

The module's functions are the method registry's, and they understand "method+allocation"
names ("wanda+owl"): a method that accepts an allocation, with one attached.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import pkgutil
from contextlib import contextmanager
from typing import Optional

from prunebench.contract import STATS_NONE, Pruner, config_to_dict
from prunebench.errors import UserError

ENTRY_POINT_GROUP = "prunebench.methods"
BUILTIN_PACKAGE = "prunebench.methods"
log = logging.getLogger("prunebench")

# Where the classes being registered come from, set while a plugin file or an entry point is
# imported (prunebench.plugins, Registry.load); None: the built-ins.  One for every registry,
# since one plugin file may register a method and an allocation.
_importing: dict = {"origin": None}


@contextmanager
def importing(origin: Optional[dict]):
    """Record what registers inside as coming from `origin` ({"kind": "plugin", "file": ...})."""
    saved, _importing["origin"] = _importing["origin"], origin
    try:
        yield
    finally:
        _importing["origin"] = saved


def _same_class(a: type, b: type) -> bool:
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


class Registry:
    """Classes of one kind of plugin by name, with their aliases and where each came from.

    A name (or alias) that another class already holds is refused, so a plugin can never pass its
    records off as a built-in's; the user may allow it for one name (`allow_replacing`, from
    `--replace NAME`), and the records then carry the plugin's identity.
    """

    def __init__(self, kind: str, plural: str, *, base: Optional[type] = None, package: Optional[str] = None,
                 entry_point_group: Optional[str] = None, loaded_with: Optional["Registry"] = None,
                 replace_option: Optional[str] = None):
        self.kind = kind  # how messages name one: "method"
        self.plural = plural
        self.base = base  # a registered class must subclass it (None: any class)
        self.package = package  # the built-ins: every public module of this package, imported by name
        self.entry_point_group = entry_point_group
        # another registry whose modules register this one's classes too (the allocations live in
        # methods/): loading it loads this one
        self.loaded_with = loaded_with
        self.replace_option = replace_option  # the command-line option that allows a replacement
        self._classes: dict = {}
        self._aliases: dict = {}
        self._origins: dict = {}  # name -> {"kind": builtin | plugin | entry_point, ...}
        self._loaded = {"builtins": False, "entry_points": False}
        self._replaceable: set = set()  # built-in names the user explicitly allowed a plugin to take

    # -- registering ---------------------------------------------------------------------------

    def register(self, cls=None, *, name: str | None = None, aliases: tuple = ()):
        """Class decorator: `@register` or `@register(name="x", aliases=("y",))`."""

        def wrap(klass):
            key = (name or klass.name or "").lower()
            if not key:
                raise UserError(f"{klass.__name__} needs a name", hint="set name = \"...\" on the class or @register(name=...)")
            if self.base is not None and not issubclass(klass, self.base):
                raise UserError(f"{klass.__name__} must subclass {self.base.__module__}.{self.base.__qualname__}")
            origin = dict(_importing["origin"] or {"kind": "builtin"})
            if origin["kind"] != "builtin":  # a plugin registers only after the built-ins, so a clash is always seen
                self.load_builtins()
            existing = self._classes.get(key)
            replaces = False
            if existing is not None and not _same_class(existing, klass):
                if key in self._replaceable and origin["kind"] != "builtin":
                    replaces = self._origins.get(key, {}).get("kind") == "builtin"
                    log.warning("%s %r: the plugin %s replaces %s.%s (%s)", self.kind, key, origin.get("file"),
                                existing.__module__, existing.__qualname__, self.replace_option)
                else:
                    allow = f", or pass {self.replace_option} {key} to use it instead" if self.replace_option else ""
                    raise UserError(f"{self.kind} name {key!r} is already taken by {existing.__module__}.{existing.__qualname__}",
                                    hint=f"give the plugin another name{allow}")
            all_aliases = [a.lower() for a in tuple(aliases) + tuple(getattr(klass, "aliases", ()))]
            for alias in all_aliases:
                holder = self._aliases.get(alias, alias if alias in self._classes else None)
                if holder is not None and holder != key and not (holder in self._replaceable and origin["kind"] != "builtin"):
                    raise UserError(f"alias {alias!r} of {self.kind} {key!r} is already taken by {self.kind} {holder!r}",
                                    hint="choose another alias")
            klass.name = key
            self._classes[key] = klass
            self._origins[key] = {**origin,
                                  "replaces_builtin": replaces or self._origins.get(key, {}).get("replaces_builtin", False)}
            for alias in all_aliases:
                self._aliases[alias] = key
            return klass

        return wrap(cls) if cls is not None else wrap

    def allow_replacing(self, names) -> None:
        """Let a plugin take these built-in names: the user asked for it explicitly."""
        self._replaceable.update(n.strip().lower() for n in names if n.strip())

    def replaceable(self) -> tuple:
        """The names allowed to be replaced in this process, for a worker process to allow them too."""
        return tuple(sorted(self._replaceable))

    # -- loading -------------------------------------------------------------------------------

    def load_builtins(self) -> None:
        if self.loaded_with is not None:
            return self.loaded_with.load_builtins()
        if self._loaded["builtins"] or self.package is None:
            return
        self._loaded["builtins"] = True
        # Found by name, like entry points: the registry sits below the classes it lists.
        pkg = importlib.import_module(self.package)
        with importing(None):
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")

    def load(self) -> None:
        """The built-ins, then the installed entry points (each once)."""
        if self.loaded_with is not None:
            return self.loaded_with.load()
        self.load_builtins()
        if self._loaded["entry_points"] or self.entry_point_group is None:
            return
        self._loaded["entry_points"] = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            dist = getattr(ep, "dist", None)
            origin = {"kind": "entry_point", "package": getattr(dist, "name", None),
                      "package_version": getattr(dist, "version", None), "entry_point": getattr(ep, "value", None)}
            try:
                with importing(origin):
                    obj = ep.load()  # a module that registers on import, or a class
                    if isinstance(obj, type) and issubclass(obj, self.base or object) and not any(
                            _same_class(obj, c) for c in self._classes.values()):
                        self.register(obj, name=obj.name or ep.name)
            except UserError:
                raise
            except Exception as exc:
                raise UserError(f"entry point {ep.name!r} ({getattr(ep, 'value', '?')}) of group {self.entry_point_group} "
                                f"failed to load: {type(exc).__name__}: {exc}"[:300], hint="fix or uninstall that package") from None

    # -- looking up ----------------------------------------------------------------------------

    def available(self) -> list:
        self.load()
        return sorted(self._classes)

    def resolve(self, name: str) -> str:
        """The registered name behind a name or alias, in any case."""
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"a {self.kind} name must be a non-empty string, got {name!r}"[:200], hint=self._known())
        key = name.strip().lower()
        self.load()
        key = self._aliases.get(key, key)
        if key not in self._classes:
            raise UserError(f"unknown {self.kind} {name!r}", hint=self._known())
        return key

    def _known(self) -> str:
        return f"known {self.plural}: {', '.join(self.available())}"

    def get(self, name: str) -> type:
        return self._classes[self.resolve(name)]

    def create(self, name: str, config=None, **overrides):
        return self.get(name)(config, **overrides)

    def origin(self, name: str) -> dict:
        return dict(self._origins.get(self.resolve(name), {"kind": "builtin"}))

    def aliases_of(self, name: str) -> list:
        key = self.resolve(name)
        return sorted(a for a, k in self._aliases.items() if k == key)

    def classes(self) -> dict:
        """name -> class of everything registered so far (loads nothing)."""
        return dict(self._classes)

    def from_plugins(self) -> set:
        """The names a plugin file or an entry point registered (loads nothing)."""
        return {k for k in self._classes if self._origins.get(k, {}).get("kind", "builtin") != "builtin"}


METHODS = Registry("method", "methods", base=Pruner, package=BUILTIN_PACKAGE, entry_point_group=ENTRY_POINT_GROUP,
                   replace_option="--replace")
# Registered by modules of prunebench.methods (they are methods in all but name).
ALLOCATIONS = Registry("sparsity allocation", "allocations", loaded_with=METHODS)

# ---------------------------------------------------------------------------------------------
# The method registry, with "method+allocation" names

register = METHODS.register
available = METHODS.available
allow_replacing = METHODS.allow_replacing
replaceable = METHODS.replaceable

ALLOCATION_SEPARATOR = "+"  # "wanda+owl": a layer-wise method with a per-block sparsity allocation


def split_name(name: str) -> tuple:
    """'wanda+owl' -> ('wanda', 'owl'); 'wanda' -> ('wanda', None)."""
    base, sep, allocation = name.partition(ALLOCATION_SEPARATOR)
    return base.strip(), (allocation.strip() if sep else None)


def resolve(name: str) -> str:
    """The registered name of a method, an alias or 'method+allocation' ('Wanda+OWL' -> 'wanda+owl')."""
    base, allocation = split_name(name) if isinstance(name, str) else (name, None)
    if allocation is None:
        return METHODS.resolve(name)
    key = METHODS.resolve(base)
    if not METHODS.get(key).accepts_allocation:
        raise UserError(f"{name!r}: a sparsity allocation composes with layer-wise methods only, and "
                        f"{key!r} is not one", hint="e.g. wanda+owl, sparsegpt+alphapruning")
    return f"{key}{ALLOCATION_SEPARATOR}{ALLOCATIONS.resolve(allocation)}"


def get(name: str) -> type:
    """The method class (for 'wanda+owl' the layer-wise method's)."""
    return METHODS.get(split_name(resolve(name))[0])


def origin(name: str) -> dict:
    """Where the method came from (for 'wanda+owl' the layer-wise method)."""
    return METHODS.origin(split_name(resolve(name))[0])


def create(name: str, config=None, **overrides) -> Pruner:
    """An instance of the method.  For 'method+allocation' the config may hold the allocation's
    own options under the key "allocation"; the instance then carries `.allocation`."""
    key = resolve(name)
    base, allocation = split_name(key)
    if allocation is None:
        return METHODS.create(key, config, **overrides)
    if config is not None and not isinstance(config, dict):
        raise UserError(f"method {key!r}: config must be a mapping", hint="write config: {option: value, allocation: {...}}")
    config = dict(config or {})
    config.update(overrides)
    allocation_config = config.pop("allocation", None) or {}
    if not isinstance(allocation_config, dict):
        raise UserError(f"allocation {allocation!r}: its config must be a mapping, got {allocation_config!r}"[:200])
    pruner = METHODS.create(base, config)
    pruner.allocation = ALLOCATIONS.create(allocation, allocation_config)
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
        cls = METHODS.get(key)
        defaults = {}
        for f in dataclasses.fields(cls.Config):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                defaults[f.name] = f.default_factory()  # type: ignore[misc]
        entry = {"name": key, "display": display_name(key), "kind": cls.kind, "aliases": METHODS.aliases_of(key),
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
