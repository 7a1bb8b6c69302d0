"""Every registered pruner, on tiny models of every family: achieved sparsity, valid pattern,
and the same masks from the same seed."""
import pytest
import torch

from prunebench import registry
from prunebench.models import all_prunable, load_tiny, weight_matrix
from prunebench.registry import PruneContext
from prunebench.sparsity import SparsitySpec, is_valid_mask

from conftest import TINY_FAMILIES

SPECS = ("0.5", "0.6@layer", "2:4")
# Small settings so end-to-end methods finish in seconds; layer-wise methods use their defaults.
FAST_CONFIGS = {"leap": {"preset": "tiny"}}


def _methods():
    return [m for m in registry.available() if m != "dense"]


def _prune(method, family, spec, calib, seed=0):
    loaded = load_tiny(family, seed=0)
    pruner = registry.create(method, FAST_CONFIGS.get(method, {}))
    ctx = PruneContext(sparsity=spec, calibration=calib, seed=seed, progress=False, registry=registry,
                       tokenizer=loaded.tokenizer, calibration_dataset="lee")
    torch.manual_seed(seed)
    pruner.prune(loaded.model, ctx)
    # weight_matrix gives [out, in] for every storage (GPT-2's Conv1D stores [in, out])
    return {name: weight_matrix(m).detach().clone() for name, m in all_prunable(loaded.model).items()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", _methods())
def test_conformance(method, family, calib_windows):
    cls = registry.get(method)
    for text in SPECS:
        spec = SparsitySpec.parse(text)
        if spec.pattern not in cls.capabilities.patterns:
            continue
        weights = _prune(method, family, spec, calib_windows)
        resolved = spec.resolved(getattr(cls, "default_scope", "row"))
        total = sum(w.numel() for w in weights.values())
        zeros = sum((w == 0).sum().item() for w in weights.values())
        if spec.pattern == "nm":
            for name, w in weights.items():
                assert is_valid_mask(w != 0, resolved), f"{method} {family} {text}: {name} breaks {spec.pattern_name}"
        assert zeros / total == pytest.approx(spec.target, abs=0.005), f"{method} {family} {text}: {zeros / total:.4f}"
        again = _prune(method, family, spec, calib_windows)
        for name in weights:
            assert torch.equal(weights[name] != 0, again[name] != 0), f"{method} {family} {text}: {name} not deterministic"
