"""`prunebench reproduce` judges a fresh run against the reference's seed noise, on real runs of
the embedded model: a perturbation the size of another CPU's float32 rounding passes, a real
change to a method (Wanda's activation-norm exponent 1 -> 2) fails, and the verdicts between
methods are carried into the table."""
import json
import shutil
import subprocess
import sys

import pytest

from prunebench.cli.command import main
from prunebench.report.reproduce import compare_runs

pytestmark = pytest.mark.slow

# Small enough for a test (three seeds of Wanda and SparseGPT: ~2 minutes on 2 cores), large
# enough for the seed spread to be a real one.
GRID = """\
models: [smollm2-135m]
methods: [wanda, sparsegpt]
sparsities: ["0.5"]
include_dense: false
calibration: {dataset: lee, n_samples: 8, seqlen: 128}
eval: {perplexity: [lee], seqlen: 128, max_ppl_windows: 16, tasks: []}
"""

# Replaces the built-in Wanda for a fresh run. JITTER: each score times (1 + 1e-6 u), u uniform in
# [-1, 1] from a fixed generator: a relative change the size of float32 rounding differences
# between CPUs, which only flips near-ties. POWER: |W| x ||X||^power, a different method.
PLUGIN = """\
from dataclasses import dataclass
import torch
from prunebench import Capabilities, LayerwisePruner, LinearResult, STATS_INPUT_NORM, register
from prunebench.sparsity.patterns import mask_from_scores

@register
class PerturbedWanda(LayerwisePruner):
    name = "wanda"
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=True, statistics=STATS_INPUT_NORM)
    default_scope = "row"

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
        scores = weight.abs() * stats.input_norm.to(weight.dtype).unsqueeze(0) ** POWER
        gen = torch.Generator().manual_seed(weight.numel())
        scores = scores * (1 + JITTER * (2 * torch.rand(scores.shape, generator=gen) - 1))
        return LinearResult(mask=mask_from_scores(scores, spec))
"""


def _run(results, grid, *extra):
    cmd = [sys.executable, "-m", "prunebench.cli.command", "run", "--grid", str(grid), "--results", str(results), "-q", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    (root / "grid.yaml").write_text(GRID)
    _run(root / "reference", root / "grid.yaml", "--seeds", "0,1,2")
    return root


def _fresh(root, name, power, jitter):
    plugin = root / f"{name}.py"
    plugin.write_text(PLUGIN.replace("POWER", str(power)).replace("JITTER", repr(jitter)))
    fresh = root / name
    # SparseGPT's seed-0 cell is the reference's own (same key, same code): only Wanda is recomputed
    (fresh / "records").mkdir(parents=True)
    for rec in (root / "reference" / "records").glob("*sparsegpt*.json"):
        if json.loads(rec.read_text())["seed"] == 0:
            shutil.copy(rec, fresh / "records" / rec.name)
    _run(fresh, root / "grid.yaml", "--seeds", "0", "--plugin", str(plugin), "--replace", "wanda")
    return compare_runs(fresh, root / "reference")


def _wanda_ppl(result):
    return next(r for r in result["rows"] if r["method"] == "wanda" and r["metric"] == "ppl:lee")


def test_the_same_code_reproduces_with_identical_masks(reference):
    fresh = reference / "same"
    _run(fresh, reference / "grid.yaml", "--seeds", "0")
    result = compare_runs(fresh, reference / "reference")
    assert result["exit_status"] == 0, json.dumps(result["cells"])
    assert {c["masks"] for c in result["cells"]} == {"identical"}
    row = _wanda_ppl(result)
    assert row["reference_seeds"] == 3 and row["reference_sd"] > 0 and row["rule"] == "3 x seed SD"
    # the verdict between the two methods was judged from the reference's three seeds
    verdict = next(v for v in result["verdicts"] if {v["method"], v["baseline"]} == {"wanda", "sparsegpt"}
                   and v["metric"] == "ppl_lee")
    assert verdict["reference_seeds"] == "3 vs 3" and verdict["kept"] is True


def test_a_rounding_sized_perturbation_is_within_seed_noise(reference):
    result = _fresh(reference, "jitter", 1, 1e-6)
    wanda = next(c for c in result["cells"] if c["method"] == "wanda")
    assert result["exit_status"] == 0, json.dumps(result["rows"])
    assert wanda["status"] == "reproduced" and wanda["masks"] in ("identical", "within seed noise")


def test_a_changed_method_is_caught(reference):
    result = _fresh(reference, "power2", 2, 0.0)
    row = _wanda_ppl(result)
    assert result["exit_status"] == 1
    assert row["within_tolerance"] is False and row["abs_diff"] > 3 * row["reference_sd"]
    assert next(c for c in result["cells"] if c["method"] == "wanda")["masks"] == "differ"
    assert main(["reproduce", "--fresh", str(reference / "power2"), "--reference", str(reference / "reference")]) == 1
