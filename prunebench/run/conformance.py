"""The conformance checks every registered method must pass, on tiny models of several families.

For each family and each sparsity spec the method supports (every registered pattern's examples,
Pattern.examples): the output passes the runner's own checks (finite weights, valid pattern,
achieved sparsity within tolerance at the scope the method reports; every other parameter the
dense model's, and the kept weights unchanged unless the method declares weight updates, then
bounded), and a second run with the same seed gives the same masks.
tests/methods/test_conformance.py runs this for every built-in; `prunebench check --plugin FILE` runs it
for a plugin's methods.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunebench.errors import UserError
from prunebench.sparsity.checks import DenseReference, OutputCheckError, check_output, effective_scope
from prunebench.modeling.models import TINY_FAMILIES, all_prunable, load_tiny, weight_matrix
from prunebench.contract import PruneContext, declares_weight_updates
from prunebench.sparsity.pattern_registry import example_specs
from prunebench.sparsity.patterns import SparsitySpec
from prunebench import registry
from prunebench.data.windows import WindowSpec, calibration_windows
from prunebench.modeling.models import tiny_tokenizer


def suite_config(method: str) -> dict:
    """The settings a method declares for this suite (Pruner.test_config: seconds on a tiny model)."""
    return dict(registry.get(method).test_config)


@dataclass
class Outcome:
    method: str
    family: str
    spec: str
    ok: bool
    reason: str = ""

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.method} | tiny:{self.family} | {self.spec}" + (f": {self.reason}" if self.reason else "")


def calibration_for_tests(n: int = 8, seqlen: int = 64) -> torch.Tensor:
    """Real English (Lee calibration documents) in the tiny models' byte tokens."""
    ids, _ = calibration_windows(tiny_tokenizer(), WindowSpec("lee", n, seqlen, 0))
    return ids


def prune_tiny(method: str, family: str, spec: SparsitySpec, calibration, *, config=None, seed: int = 0):
    """Prune a fresh tiny model; returns ({name: [out, in] weight}, PruneReport)."""
    weights, report, _ = _prune_tiny(method, family, spec, calibration, config=config, seed=seed)
    return weights, report


def _prune_tiny(method, family, spec, calibration, *, config=None, seed=0, check: bool = False):
    """prune_tiny, and with `check` the runner's checks of the output (the dense model's
    reference is taken before pruning): (weights, report, what check_output found)."""
    loaded = load_tiny(family, seed=0)
    pruner = registry.create(method, suite_config(method) if config is None else config)
    reference = DenseReference.take(loaded.model) if check else None
    ctx = PruneContext(sparsity=spec, calibration=calibration, seed=seed, progress=False, registry=registry,
                       tokenizer=loaded.tokenizer, calibration_dataset="lee")
    torch.manual_seed(seed)
    report = pruner.prune(loaded.model, ctx)
    weights = {name: weight_matrix(m).detach().clone() for name, m in all_prunable(loaded.model).items()}
    found = None
    if check:
        scope = effective_scope(spec, report.stats.get("scope"))
        found = check_output(weights.items(), spec, scope, layer_specs=report.layer_specs, model=loaded.model,
                             reference=reference, updates_weights=declares_weight_updates(pruner.capabilities, report),
                             masks=report.masks)
    return weights, report, found


def check_method(method: str, families=TINY_FAMILIES, specs=None, calibration=None, config=None) -> list[Outcome]:
    """specs: spec texts to run (None: every registered pattern's examples)."""
    cls = registry.get(method)
    specs = example_specs() if specs is None else specs
    allocation = getattr(registry.create(method, suite_config(method) if config is None else config), "allocation", None)
    calibration = calibration_for_tests() if calibration is None else calibration
    outcomes = []
    for family in families:
        for text in specs:
            spec = SparsitySpec.parse(text)
            if spec.pattern not in cls.capabilities.patterns:
                continue
            if allocation is not None:
                try:
                    allocation.check_spec(spec)
                except UserError:
                    continue  # e.g. OWL's N:M variant is defined for N:8 only
            try:
                weights, _, found = _prune_tiny(method, family, spec, calibration, config=config, check=True)
                again, _ = prune_tiny(method, family, spec, calibration, config=config)
                for name in weights:
                    if not torch.equal(weights[name] != 0, again[name] != 0):
                        raise OutputCheckError(f"{name}: a second run with the same seed gave another mask")
                update = (found or {}).get("weight_update") or {}
                note = (f"kept weights updated, relative change {update['mean']:.3g} mean, {update['max']:.3g} max"
                        if "mean" in update else "")
                outcomes.append(Outcome(method, family, text, True, note))
            except OutputCheckError as exc:
                outcomes.append(Outcome(method, family, text, False, str(exc)))
            except Exception as exc:  # a crash is a failed check too, with its reason
                first = str(exc).splitlines()[0] if str(exc) else ""
                outcomes.append(Outcome(method, family, text, False, f"{type(exc).__name__}: {first}"))
    return outcomes
