"""Grid and cell specifications, YAML loading and presets.

A grid is models x methods x sparsities plus one calibration, evaluation and seed setting;
it expands into cells.  Every spec is a dataclass and loading rejects unknown keys, so a typo
in a grid file is an error, not a silently ignored option.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from . import registry
from .errors import UserError
from .registry import config_to_dict
from .sparsity import SparsitySpec

SCHEMA_VERSION = 1
DENSE = "dense"


@dataclass
class MethodSpec:
    name: str
    config: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, value) -> "MethodSpec":
        if isinstance(value, MethodSpec):
            return value
        if isinstance(value, str):
            return cls(name=registry.resolve(value))
        if isinstance(value, dict):
            _reject_unknown(value, cls, "method")
            return cls(name=registry.resolve(value["name"]), config=dict(value.get("config") or {}))
        raise UserError(f"cannot read method entry {value!r}", hint="write a name or {name: ..., config: {...}}")

    def resolved_config(self) -> dict:
        """Every hyperparameter the method will use: defaults overlaid with the given ones."""
        return config_to_dict(registry.create(self.name, self.config).config)


@dataclass
class CalibrationSpec:
    dataset: str = "lee"
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass
class EvalSpec:
    perplexity: list = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    tasks: list = field(default_factory=list)  # lm-eval task names or presets; [] = none
    limit: Optional[int] = None  # documents per zero-shot task (quick runs)
    batch_size: int = 1  # perplexity windows per forward
    zeroshot_batch_size: int = 16  # lm-eval requests per forward (set on HFLM)
    max_ppl_windows: Optional[int] = None


@dataclass
class GridSpec:
    models: list
    methods: list
    sparsities: list = field(default_factory=lambda: ["0.5"])
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    data_dir: Optional[str] = None
    include_dense: bool = True
    trust_remote_code: bool = False

    def cells(self) -> list["CellSpec"]:
        """Dense once per model (a cell of its own), then every method x sparsity."""
        from .models import check_model_spec

        for model in self.models:
            check_model_spec(model)
        methods = [MethodSpec.parse(m) for m in self.methods]
        sparsities = [SparsitySpec.parse(s) for s in self.sparsities]
        cells = []
        for model in self.models:
            if self.include_dense or any(m.name == DENSE for m in methods):
                cells.append(self._cell(model, MethodSpec(DENSE), SparsitySpec(0.0)))
            for method in methods:
                if method.name == DENSE:
                    continue
                pruner_cls = registry.get(method.name)
                for sp in sparsities:
                    if sp.pattern not in pruner_cls.capabilities.patterns:
                        raise UserError(f"method {method.name!r} does not support the {sp.pattern_name} pattern",
                                        hint=f"it supports: {', '.join(pruner_cls.capabilities.patterns)}")
                    cells.append(self._cell(model, method, sp))
        return cells

    def _cell(self, model, method, sparsity) -> "CellSpec":
        return CellSpec(model=model, method=method.name, method_config=method.resolved_config(),
                        sparsity=sparsity, calibration=self.calibration, eval=self.eval, seed=self.seed,
                        dtype=self.dtype)


@dataclass
class CellSpec:
    model: str
    method: str
    method_config: dict
    sparsity: SparsitySpec
    calibration: CalibrationSpec
    eval: EvalSpec
    seed: int
    dtype: str

    def identity(self) -> dict:
        """What determines the result; hashed into the cell key.  Where files live does not."""
        needs_calibration = registry.get(self.method).capabilities.needs_calibration
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model, "dtype": self.dtype,
            "method": self.method, "method_config": self.method_config,
            "sparsity": self.sparsity.to_dict(),
            "calibration": dataclasses.asdict(self.calibration) if needs_calibration else None,
            "eval": dataclasses.asdict(self.eval),
            "seed": self.seed,
        }

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()

    @property
    def sparsity_label(self) -> str:
        return "dense" if self.method == DENSE else self.sparsity.label

    @property
    def label(self) -> str:
        return f"{self.model} | {self.method} | {self.sparsity_label}"


# ---------------------------------------------------------------------------------------------
# Loading

def _reject_unknown(data: dict, cls, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} in {where}", hint=f"known keys: {', '.join(sorted(known))}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {type(data).__name__}")
    _reject_unknown(data, cls, where)
    return cls(**data)


def grid_from_dict(data: dict, where: str = "grid") -> GridSpec:
    data = dict(data)
    if "preset" in data:
        base = dataclasses.asdict(preset(data.pop("preset")))
        for section in ("calibration", "eval"):
            if section in data:
                merged = dict(base[section])
                sub = data.pop(section) or {}
                _reject_unknown(sub, CalibrationSpec if section == "calibration" else EvalSpec, f"{where}.{section}")
                merged.update(sub)
                base[section] = merged
        base.update(data)
        data = base
    for required in ("models", "methods"):
        if required not in data:
            raise UserError(f"{where} has no {required!r}", hint="a grid needs models and methods (or a preset)")
    data["calibration"] = _build(CalibrationSpec, data.get("calibration") or {}, f"{where}.calibration")
    data["eval"] = _build(EvalSpec, data.get("eval") or {}, f"{where}.eval")
    for listy in ("models", "methods", "sparsities"):
        if listy in data and isinstance(data[listy], (str, int, float)):
            data[listy] = [s.strip() for s in str(data[listy]).split(",") if s.strip()]
    grid = _build(GridSpec, data, where)
    if not grid.models:
        raise UserError("the grid has no models", hint="--models smollm2-135m")
    return grid


def load_grid(path) -> GridSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read grid file {str(path)!r}: {exc.strerror}", hint="check the path") from None
    except yaml.YAMLError as exc:
        raise UserError(f"grid file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return grid_from_dict(data or {}, where=path.name)


PRESETS = ("embedded", "paper")


def preset(name: str) -> GridSpec:
    """Named grids shipped with prunebench (prunebench/presets/<name>.yaml)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}", hint=f"known presets: {', '.join(PRESETS)}")
    text = resources.files("prunebench").joinpath("presets", f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    return grid_from_dict(data, where=f"preset {name}")
