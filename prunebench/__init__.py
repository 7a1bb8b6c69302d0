"""prunebench: LLM weight-pruning methods compared on one footing.

The plugin API: everything a method file needs is importable from here (`from prunebench import
LayerwisePruner, LinearResult, register`). The names resolve on first use, so `import prunebench`
(every command does) loads neither torch nor the engines until a method asks for them.
"""
import importlib

from prunebench.version import __version__  # noqa: F401

_CONTRACT = "prunebench.contract"
_PATTERNS = "prunebench.sparsity.patterns"
_LAYERWISE = "prunebench.engines.layerwise"
_LEARNED = "prunebench.engines.masklearn"
_LEARNED_CONFIG = "prunebench.engines.masklearn_config"
PUBLIC = {
    **{name: _CONTRACT for name in (
        "Pruner", "Capabilities", "LayerStats", "LinearResult", "PruneContext", "PruneReport",
        "combine_stats", "STATS_NONE", "STATS_INPUT_NORM", "STATS_HESSIAN", "STATS_INPUT_MOMENTS")},
    "register": "prunebench.registry",
    "LayerwisePruner": _LAYERWISE,
    **{name: _PATTERNS for name in ("SparsitySpec", "mask_from_scores", "nm_mask", "measure_sparsity")},
    "LearnedMaskPruner": _LEARNED,
    **{name: _LEARNED_CONFIG for name in ("MaskTrainingConfig", "linear_schedule", "fading")},
}
__all__ = ["__version__", *PUBLIC]


def __getattr__(name: str):
    if name in PUBLIC:
        return getattr(importlib.import_module(PUBLIC[name]), name)
    raise AttributeError(f"module 'prunebench' has no attribute {name!r}")
