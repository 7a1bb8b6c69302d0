"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score S_ij = |W_ij| * ||X_j||_2, the weight magnitude times the L2 norm of its input feature over
the calibration tokens; compared within each output row (the paper's default), or in groups of
M consecutive inputs for N:M.  No weight update.
"""
from dataclasses import dataclass

import torch

from prunebench.contract import Capabilities, LinearResult, STATS_INPUT_NORM
from prunebench.engines.layerwise import LayerwisePruner
from prunebench.registry import register
from prunebench.sparsity.patterns import mask_from_scores


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| scaled column-wise by the input-feature norms: [out, in] * [in]."""
    return weight.abs() * input_norm.to(weight.dtype).unsqueeze(0)


@register
class Wanda(LayerwisePruner):
    name = "wanda"
    display = "Wanda"
    summary = "|W| x input-activation norm, per output row (Sun et al. 2023)"
    cost_ratio = 1.12  # prune time over floor-1: results/benchmarks/layerwise_methods.json
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=True, statistics=STATS_INPUT_NORM)
    default_scope = "row"

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
        return LinearResult(mask=mask_from_scores(wanda_scores(weight, stats.input_norm), spec))
