"""What the end-to-end tests on tiny models share: the flags of a quick cell, `prunebench run` in
this process, the records it wrote and a plugin file written from a test's text."""
import hashlib
import textwrap
from pathlib import Path

from prunebench.cli.command import main
from prunebench.store.records import load_records

# A cell in seconds: 4 calibration windows and at most 16 evaluation windows of 64 tokens, no tasks.
TINY = ["--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "lee", "--tasks", "none",
        "--max-ppl-windows", "16", "-q"]


def run(*args) -> int:
    return main(["run", *args])


def by_method(results) -> dict:
    """The records under `results`, by (method, sparsity label)."""
    recs, _ = load_records(results)
    return {(r["method"]["name"], r["sparsity"]["label"]): r for r in recs}


def snapshot(folder: Path) -> dict:
    """Every file under a folder with its content hash (and nothing else appears or vanishes)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_plugin(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


# A layer-wise method whose prune_linear is the test's {body}: no calibration, layer scope.
LAYERWISE_PLUGIN = '''
from dataclasses import dataclass
import torch
from prunebench import Capabilities, LayerwisePruner, LinearResult, STATS_NONE, register
from prunebench.sparsity.patterns import mask_from_scores, SparsitySpec

@register
class {cls}(LayerwisePruner):
    name = "{name}"
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=False, statistics=STATS_NONE)
    default_scope = "layer"

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
{body}
'''


def layerwise_plugin(tmp_path: Path, name: str, body: str, cls: str = "TestMethod") -> Path:
    return write_plugin(tmp_path / f"{name}.py", LAYERWISE_PLUGIN.format(cls=cls, name=name,
                                                                         body=textwrap.indent(textwrap.dedent(body), " " * 8)))
