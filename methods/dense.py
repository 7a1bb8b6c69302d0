"""The dense baseline: prunes nothing, so every grid has a reference row."""
from dataclasses import dataclass

from prunebench.contract import Capabilities, PruneReport, Pruner
from prunebench.registry import register


@register
class Dense(Pruner):
    name = "dense"
    display = "Dense"
    kind = "dense"
    summary = "no pruning: the dense reference model"
    capabilities = Capabilities(patterns=("unstructured",), needs_calibration=False)

    @dataclass
    class Config:
        pass

    def prune(self, model, ctx):
        return PruneReport()
