"""Magnitude pruning: keep the largest |W|.

As the baseline of the Wanda paper (Sun et al. 2023): one threshold over the whole matrix by
default (scope "layer"); "0.5@row" compares within each output row; N:M along the input dimension.
"""
from dataclasses import dataclass

from prunebench.contract import Capabilities, LinearResult, STATS_NONE
from prunebench.engines.layerwise import LayerwisePruner
from prunebench.registry import register
from prunebench.sparsity.patterns import mask_from_scores


@register
class Magnitude(LayerwisePruner):
    name = "magnitude"
    display = "Magnitude"
    aliases = ("mag",)
    summary = "keep the largest |W| (one threshold per matrix, Wanda-paper protocol)"
    # prune time over floor-1: benchmarks/layerwise_methods.py, results/benchmarks/layerwise_methods.json
    cost_ratio = 0.26
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=False, statistics=STATS_NONE)
    default_scope = "layer"

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
        return LinearResult(mask=mask_from_scores(weight.abs(), spec))
