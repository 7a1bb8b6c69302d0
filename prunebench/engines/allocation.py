"""Per-block sparsity allocation for the layer-wise engine: how a global target is spread over
the decoder blocks before any block is pruned.

An allocation composes with any layer-wise method ("wanda+owl", "sparsegpt+alphapruning").  Like
the methods, it supplies only the mathematics: a score per block from the block's weights (and,
if it asks for them, the dense model's input statistics), and the per-block specs from those
scores.  The data pipeline (one dense pass over the calibration batches, block by block, when
the allocation needs activations, on the engine's own block pass) lives here, in
`Allocation.allocate`: the engine calls it before pruning any block, hands each block its spec
and records targets and achieved values.

Allocations are registered by name with `register_allocation` in prunebench.registry.ALLOCATIONS,
the built-in ones from modules in prunebench.methods (they are methods in all but name); the
registry composes "method+allocation" names.  The default is uniform: every block the cell's
spec, no extra pass.
"""
from __future__ import annotations

from typing import ClassVar

from prunebench.contract import STATS_NONE, LayerStats, config_to_dict, make_config
from prunebench.engines.layerwise import _module_device, collect_block_stats
from prunebench.errors import UserError
from prunebench.modeling.models import weight_matrix, prunable_linears
from prunebench.progress import progress_bar
from prunebench.registry import ALLOCATIONS
from prunebench.sparsity.patterns import SparsitySpec

register_allocation = ALLOCATIONS.register
available = ALLOCATIONS.available


class Allocation:
    """Base class.  Subclasses set `name`, `Config`, `statistics` and `patterns`."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()
    summary: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # how reports write it (default: the name)
    Config: ClassVar[type]
    # STATS_NONE: weights only (no calibration pass); STATS_INPUT_NORM: also the dense model's
    # input-feature norms, block by block (the inputs of block l are the dense outputs of l-1).
    statistics: ClassVar[str] = STATS_NONE
    patterns: ClassVar[tuple] = ("unstructured",)

    def __init__(self, config=None, **overrides):
        self.config = make_config(self.Config, config, overrides)

    def check_spec(self, spec: SparsitySpec) -> None:
        if spec.pattern not in self.patterns:
            raise UserError(f"allocation {self.name!r} does not support the {spec.pattern_name} pattern",
                            hint=f"it supports: {', '.join(self.patterns)}")

    def block_score(self, linears: dict, spec: SparsitySpec) -> float:
        """One number per block. linears: name -> (float32 weight [out, in], LayerStats)."""
        raise NotImplementedError

    def block_specs(self, scores: list, sizes: list, spec: SparsitySpec) -> list:
        """The per-block specs (one per block, in order) that spend the cell's budget."""
        raise NotImplementedError

    def allocate(self, blocks, spec: SparsitySpec, hidden, args, kwargs, device, activation_device="cpu",
                 progress=False):
        """Per-block specs for the cell's `spec`, and what to record about them: what the layer-wise
        engine asks before it prunes any block (hidden, args, kwargs: block 0's dense inputs)."""
        self.check_spec(spec)
        per_block = _block_inputs_stats(blocks, self, hidden, args, kwargs, device, activation_device, progress)
        scores = [float(self.block_score(linears, spec)) for linears in per_block]
        sizes = [sum(w.numel() for w, _ in linears.values()) for linears in per_block]
        del per_block
        specs = self.block_specs(scores, sizes, spec)
        if len(specs) != len(blocks):
            raise RuntimeError(f"allocation {self.name!r} returned {len(specs)} specs for {len(blocks)} blocks")
        planned = sum(s.target * n for s, n in zip(specs, sizes)) / max(sum(sizes), 1)
        info = {"name": self.name, "config": config_to_dict(self.config), "block_scores": [round(x, 6) for x in scores],
                "block_targets": [round(s.target, 6) for s in specs], "block_labels": [s.label for s in specs],
                "block_sizes": sizes, "planned_sparsity": round(planned, 6)}
        return specs, info


def display_name(name: str) -> str:
    cls = ALLOCATIONS.get(name)
    return cls.display_name or cls.name


def describe() -> list:
    return [{"name": k, "summary": c.summary, "statistics": c.statistics, "patterns": list(c.patterns),
             "defaults": config_to_dict(c.Config())} for k, c in sorted(ALLOCATIONS.classes().items())]


def _block_inputs_stats(blocks, allocation, hidden, args, kwargs, device, activation_device, progress):
    """Per block: {name: (weight, LayerStats)} of the *dense* model, with the statistics the
    allocation asks for from one dense pass (no block is pruned yet)."""
    per_block = []
    bar = progress_bar(total=len(blocks), desc=f"{allocation.name} statistics", enabled=progress, unit="block")
    for index, block in enumerate(blocks):
        linears = prunable_linears(block)
        if allocation.statistics == STATS_NONE:
            per_block.append({n: (weight_matrix(m).detach().float(), LayerStats(n_tokens=0)) for n, m in linears.items()})
        else:
            home = _module_device(block)
            block.to(device)
            # one dense pass gives both the statistics and the next block's (dense) inputs
            groups, stats, hidden = collect_block_stats(block, linears, allocation.statistics, hidden, args, kwargs,
                                                        device, activation_device, keep_outputs=True)
            shared = {name: stats[g[0]] for g in groups for name in g}
            per_block.append({n: (weight_matrix(m).detach().float(), shared[n]) for n, m in linears.items()})
            block.to(home)
        bar.update(1)
    bar.close()
    return per_block


def clip_targets(targets, low: float = 0.0, high: float = 0.99) -> list:
    """Keep per-block targets inside what a mask can do (a score spread at a high global target
    can ask for more than 100%); the references clip likewise (OWL: at least 1% is kept)."""
    return [min(max(float(t), low), high) for t in targets]


