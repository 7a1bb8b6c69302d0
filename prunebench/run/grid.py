"""Grid and cell specifications, YAML loading and presets.

A grid is models x seeds x methods x sparsities plus one calibration and evaluation setting;
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
from typing import Dict, Optional, Union


from prunebench import registry
from prunebench.bounded_yaml import MAX_YAML_BYTES, load_yaml
from prunebench.errors import UserError
from prunebench.typecheck import check_fields
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.evaluate import local_tasks, zeroshot
from prunebench.data.windows import text_fingerprint
from prunebench.provenance.identity import file_sha256, sha256_json, tree_sha256
from prunebench.modeling.models import check_model_spec
from prunebench.provenance.identity import evaluation_code_sha256, method_identity
from prunebench.modeling.models import model_fingerprint
from prunebench.modeling import sequence_start as starts

# 2: keys hold content fingerprints (model file, texts, method and evaluation code) and the device.
SCHEMA_VERSION = 2
DENSE = "dense"


@dataclass
class MethodSpec:
    name: str
    config: dict = field(default_factory=dict)
    # this method's own sparsities, in place of the grid's (PATCH's hybrid targets beside 2:4 cells)
    sparsities: Optional[list] = None

    @classmethod
    def parse(cls, value) -> "MethodSpec":
        if isinstance(value, MethodSpec):
            return value
        if isinstance(value, str):
            return cls(name=registry.resolve(value))
        if isinstance(value, dict):
            _reject_unknown(value, cls, "method")
            if "name" not in value:
                raise UserError(f"method entry {value!r} has no name"[:200], hint="write {name: leap, config: {...}}")
            config = value.get("config") or {}
            if not isinstance(config, dict):
                raise UserError(f"method {value['name']!r}: config must be a mapping, got {config!r}"[:200],
                                hint="write config: {option: value}")
            sparsities = value.get("sparsities")
            if sparsities is not None and (not isinstance(sparsities, list) or not sparsities):
                raise UserError(f"method {value['name']!r}: sparsities must be a non-empty list, got {sparsities!r}"[:200],
                                hint='e.g. sparsities: ["hybrid:0.35/64"]')
            return cls(name=registry.resolve(value["name"]), config=dict(config),
                       sparsities=None if sparsities is None else [str(x) for x in sparsities])
        raise UserError(f"cannot read method entry {value!r}", hint="write a name or {name: ..., config: {...}}")

    def resolved_config(self) -> dict:
        """Every hyperparameter the method will use: defaults overlaid with the given ones."""
        return registry.resolved_config(registry.create(self.name, self.config))


@dataclass
class CalibrationSpec:
    dataset: str = "lee"
    n_samples: int = 128
    seqlen: int = 2048
    encoding: str = "utf-8"  # for a dataset named by a text path
    # No seed here: which windows are drawn follows the cell's seed (the grid's `seeds` axis).


@dataclass
class EvalSpec:
    perplexity: list = field(default_factory=lambda: ["wikitext2"])  # dataset names or text paths
    seqlen: int = 2048
    tasks: list = field(default_factory=list)  # lm-eval task names or presets; [] = none
    # documents per zero-shot task (per subject for MMLU), or a fraction of each; a mapping gives
    # each task its own ({mmlu: 5, piqa: 200}: a task it leaves out is scored whole)
    limit: Optional[Union[int, float, Dict[str, Union[int, float]]]] = None
    batch_size: int = 1  # perplexity windows per forward
    zeroshot_batch_size: int = 16  # lm-eval requests per forward (set on HFLM)
    max_ppl_windows: Optional[int] = None
    encoding: str = "utf-8"  # for perplexity text named by a path


@dataclass
class GridSpec:
    models: list
    methods: list
    sparsities: list = field(default_factory=lambda: ["0.5"])
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    # One cell per seed for every method the seed changes (the calibration draw and the method's
    # own random choices); a seed-invariant cell (dense, magnitude) runs once, at the first seed.
    seeds: list = field(default_factory=lambda: [0])
    dtype: str = "float32"
    device: str = "cpu"
    data_dir: Optional[str] = None
    include_dense: bool = True
    trust_remote_code: bool = False

    def cells(self) -> list["CellSpec"]:
        """Dense once per model (a cell of its own), then per seed every method x sparsity; a
        seed-invariant method (Capabilities.seed_dependent false) only at the first seed."""
        for model in self.models:
            check_model_spec(model)
        methods = [MethodSpec.parse(m) for m in self.methods]
        sparsities = [SparsitySpec.parse(s) for s in self.sparsities]
        cells = []
        for model in self.models:
            if self.include_dense or any(m.name == DENSE for m in methods):
                cells.append(self._cell(model, MethodSpec(DENSE), SparsitySpec(0.0), self.seeds[0]))
            # seed-major, so an interrupted grid holds whole seeds; a seed-invariant cell runs at the first
            for seed in self.seeds:
                for method in methods:
                    if method.name == DENSE:
                        continue
                    pruner_cls = registry.get(method.name)
                    if seed != self.seeds[0] and not pruner_cls.capabilities.seed_dependent:
                        continue
                    own = None if method.sparsities is None else [SparsitySpec.parse(x) for x in method.sparsities]
                    for sp in own or sparsities:
                        # the configured instance's check: a method that runs another (DSnoT over
                        # an initial mask) also refuses a pattern the other cannot give
                        registry.create(method.name, method.config).check_spec(sp)
                        cells.append(self._cell(model, method, sp, seed))
        return cells

    def _cell(self, model, method, sparsity, seed) -> "CellSpec":
        return CellSpec(model=model, method=method.name, method_config=method.resolved_config(),
                        sparsity=sparsity, calibration=self.calibration, eval=self.eval, seed=seed,
                        dtype=self.dtype, device=self.device, data_dir=self.data_dir,
                        trust_remote_code=self.trust_remote_code)


def device_kind(device: str) -> str:
    """The part of a device string that can change the numbers: cpu, cuda, mps (not the index)."""
    return str(device).split(":", 1)[0].lower()


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
    device: str = "cpu"
    data_dir: Optional[str] = None  # where local files are read from: not identity, their content is
    trust_remote_code: bool = False  # the model folder's own Python code ran: in the key only when true

    def identity(self) -> dict:
        """Everything that changes the cell's numbers, hashed into its key: content fingerprints
        of the model file and of the calibration and evaluation text (never a path or a dataset
        name), the dtype, the device, the seed, and the method's and the evaluation's code."""
        if getattr(self, "_identity", None) is None:
            pruner = registry.create(self.method, self.method_config)
            # Every window starts with the tokenizer's sequence start (prunebench.modeling.sequence_start):
            # its ids are part of what the windows are.
            start = starts.model_sequence_start(self.model, self.trust_remote_code)
            start = None if start is None else list(start)
            calibration = None
            if pruner.capabilities.needs_calibration:
                cs = self.calibration
                # the draw's seed is the cell's (the key has held it here since schema 2)
                calibration = {**dataclasses.asdict(cs), "seed": self.seed, "sequence_start": start,
                               "text_sha256": text_fingerprint(cs.dataset, "calibration", self.data_dir, cs.encoding)["sha256"]}
            ev = self.eval
            evaluation = {**dataclasses.asdict(ev), "sequence_start": start, "code_sha256": evaluation_code_sha256(),
                          "texts_sha256": {ds: text_fingerprint(ds, "eval", self.data_dir, ev.encoding)["sha256"]
                                           for ds in ev.perplexity},
                          "tasks_data": tasks_data_fingerprint(ev.tasks, self.data_dir)}
            self._identity = {
                "schema": SCHEMA_VERSION,
                "model": self.model, "model_fingerprint": model_fingerprint(self.model), "dtype": self.dtype,
                "device": device_kind(self.device),
                "method": self.method, "method_identity": method_identity(pruner), "method_config": self.method_config,
                "sparsity": self.sparsity.to_dict(),
                "calibration": calibration,
                "eval": evaluation,
                "seed": self.seed,
            }
            if self.trust_remote_code:  # added only when set, so every other cell keeps its key
                self._identity["trust_remote_code"] = True
        return self._identity

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()

    @property
    def sparsity_label(self) -> str:
        return "dense" if self.method == DENSE else self.sparsity.label

    @property
    def label(self) -> str:
        return f"{self.model} | {self.method} | {self.sparsity_label} | seed {self.seed}"


def tasks_data_fingerprint(tasks, data_dir) -> dict:
    """What each zero-shot task's documents are: local files by content, the embedded tasks by the
    held-out text they are built from, hub tasks by name and lm-eval version."""
    if not tasks:
        return {}

    out = {}
    for task in zeroshot.resolve_tasks(tasks, data_dir=data_dir):
        if task in zeroshot.EMBEDDED_TASKS:
            out[task] = "embedded:" + text_fingerprint("lee", "eval")["sha256"]
        elif data_dir is not None and task in local_tasks.LOCAL_TASKS:
            files = {}
            for rel in local_tasks.LOCAL_TASKS[task].inputs:
                path = Path(data_dir) / "tasks" / rel
                if not path.exists():
                    raise UserError(f"zero-shot task {task!r}: {path} not found in the data directory",
                                    hint="see shared/data/MANIFEST.md for the expected layout")
                files[rel] = tree_sha256(path) if path.is_dir() else file_sha256(path)
            out[task] = f"local:{sha256_json(files)}@lm_eval-{local_tasks.lm_eval_version()}"
        else:
            out[task] = f"hub:{task}@lm_eval-{local_tasks.lm_eval_version()}"
    return out


# ---------------------------------------------------------------------------------------------
# Loading

def _reject_unknown(data: dict, cls, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} in {where}", hint=f"known keys: {', '.join(sorted(known))}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}"[:200],
                        hint=f"write {where}: {{key: value, ...}} with keys {', '.join(f.name for f in dataclasses.fields(cls))}")
    _reject_unknown(data, cls, where)
    check_fields(cls, data, where)
    return cls(**data)


def _check_items(data: dict, where: str) -> None:
    """The list fields hold the right kinds of items (a YAML typo gives numbers or nested lists)."""
    kinds = {"models": (str,), "methods": (str, dict), "sparsities": (str, int, float)}
    for name, allowed in kinds.items():
        for item in data.get(name) or []:
            if isinstance(item, bool) or not isinstance(item, allowed):
                what = " or ".join({str: "a string", dict: "a mapping", int: "a number", float: "a number"}[k] for k in allowed)
                raise UserError(f"{where}: every entry of {name} must be {what}, got {item!r}"[:200],
                                hint={"models": "e.g. models: [smollm2-135m]", "methods": "e.g. methods: [wanda, {name: leap, config: {steps: 10}}]",
                                      "sparsities": "e.g. sparsities: ['0.5', '2:4']"}[name])


SEED_LIMIT = 2 ** 63  # seeds feed torch and numpy generators, which take a signed 64-bit integer
SEEDS_HINT = "e.g. seeds: [0, 1, 2] in a grid file or --seeds 0,1,2"


def check_seeds(seeds, where: str = "seeds") -> list:
    """A non-empty list of distinct integers in [0, 2^63); strings of digits (the CLI's) become ints."""
    if isinstance(seeds, (int, str)) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise UserError(f"{where} must be a non-empty list of integers, got {seeds!r}"[:200], hint=SEEDS_HINT)
    out = []
    for seed in seeds:
        if isinstance(seed, str):
            try:
                seed = int(seed.strip())
            except ValueError:
                pass
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"{where}: {seed!r} is not an integer"[:200], hint=SEEDS_HINT)
        if not 0 <= seed < SEED_LIMIT:
            raise UserError(f"{where}: {seed} is outside 0 .. 2^63-1"[:200], hint=SEEDS_HINT)
        if seed in out:
            raise UserError(f"{where}: seed {seed} is listed twice", hint="name each seed once")
        out.append(seed)
    return out


def _seeds_from_legacy(data: dict, where: str) -> dict:
    """`seed: N` is shorthand for `seeds: [N]`; a calibration seed of its own is gone (the draw
    follows the cell's seed), so a grid file that sets one is told where the setting went."""
    if "seed" in data:
        if "seeds" in data:
            raise UserError(f"{where}: give seeds or seed, not both", hint=SEEDS_HINT)
        data["seeds"] = data.pop("seed")
    calibration = data.get("calibration")
    if isinstance(calibration, dict) and "seed" in calibration:
        raise UserError(f"{where}: calibration.seed is not a setting: the calibration draw follows the cell's seed",
                        hint=f"drop it and list the seeds at the top level ({SEEDS_HINT})")
    return data


def grid_from_dict(data: dict, where: str = "grid") -> GridSpec:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of grid keys, got {type(data).__name__}",
                        hint="a grid file looks like: models: [...], methods: [...], sparsities: [...]")
    data = _seeds_from_legacy(dict(data), where)
    if "preset" in data:
        if not isinstance(data["preset"], str):
            raise UserError(f"{where}: preset must be a name, got {data['preset']!r}"[:200], hint=f"known presets: {', '.join(PRESETS)}")
        base = dataclasses.asdict(preset(data.pop("preset")))
        for section in ("calibration", "eval"):
            if section in data:
                merged = dict(base[section])
                sub = data.pop(section) or {}
                if not isinstance(sub, dict):
                    raise UserError(f"{where}.{section} must be a mapping, got {sub!r}"[:200])
                _reject_unknown(sub, CalibrationSpec if section == "calibration" else EvalSpec, f"{where}.{section}")
                merged.update(sub)
                base[section] = merged
        base.update(data)
        data = base
    for required in ("models", "methods"):
        if required not in data:
            raise UserError(f"{where} has no {required!r}", hint="a grid needs models and methods (or a preset)")
    if isinstance(data.get("eval"), dict):
        data["eval"] = dict(data["eval"])
        for listy in ("perplexity", "tasks"):
            if isinstance(data["eval"].get(listy), str):
                data["eval"][listy] = [s.strip() for s in data["eval"][listy].split(",") if s.strip()]
    data["calibration"] = _build(CalibrationSpec, data.get("calibration") or {}, f"{where}.calibration")
    data["eval"] = _build(EvalSpec, data.get("eval") or {}, f"{where}.eval")
    for listy in ("models", "methods", "sparsities"):
        if listy in data and isinstance(data[listy], (str, int, float)) and not isinstance(data[listy], bool):
            data[listy] = [s.strip() for s in str(data[listy]).split(",") if s.strip()]
    _check_items(data, where)
    if "seeds" in data:
        data["seeds"] = check_seeds(data["seeds"], f"{where}: seeds")
    grid = _build(GridSpec, data, where)
    if not grid.models:
        raise UserError("the grid has no models", hint="--models smollm2-135m")
    if not grid.methods and not grid.include_dense:
        raise UserError("the grid has no methods", hint="--methods wanda,sparsegpt (see `prunebench list`)")
    return grid


def load_grid(path) -> GridSpec:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # never the whole of a huge file
    except OSError as exc:
        raise UserError(f"cannot read grid file {str(path)!r}: {exc.strerror}", hint="check the path") from None
    data = load_yaml(raw, f"grid file {str(path)!r}")
    return grid_from_dict(data or {}, where=path.name)


PRESETS = ("embedded", "paper")


def preset(name: str) -> GridSpec:
    """Named grids shipped with prunebench (prunebench/presets/<name>.yaml)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}", hint=f"known presets: {', '.join(PRESETS)}")
    text = resources.files("prunebench").joinpath("presets", f"{name}.yaml").read_text()
    data = load_yaml(text, f"preset {name}")
    return grid_from_dict(data, where=f"preset {name}")
