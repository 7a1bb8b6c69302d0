"""`prunebench reproduce` judges a fresh run against the reference's seed noise, on real runs of
the embedded model: a perturbation the size of another CPU's float32 rounding passes, a real
change to a method (Wanda's activation-norm exponent 1 -> 2) fails, and the verdicts between
methods are carried into the table.

Two processes: the reference (three seeds), then the three fresh runs one after another in one
process (the same code, the rounding-sized perturbation, the changed method), each into a folder
of its own and judged here."""
import json
import shutil
import subprocess
import sys

import pytest

from prunebench.cli.command import main
from prunebench.report.reproduce import compare_runs

pytestmark = pytest.mark.slow

# Small enough for a test (Wanda at three seeds, magnitude once: it does not depend on the seed),
# large enough for Wanda's seed spread to be a real one.  Magnitude is the other side of the
# verdict between methods, far worse than Wanda: a verdict any fresh run must keep.
GRID = """\
models: [smollm2-135m]
methods: [wanda, magnitude]
sparsities: ["0.5"]
include_dense: false
calibration: {dataset: lee, n_samples: 8, seqlen: 128}
eval: {perplexity: [lee], seqlen: 128, max_ppl_windows: 16, tasks: []}
"""
REFERENCE_SEEDS = {"wanda": 3, "magnitude": 1}

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


# The fresh runs one after another in one process of their own (its start and imports paid once;
# the model loads from its cache for each run).  The built-in Wanda's run comes first: a --replace
# changes the registry for the rest of the process.
FRESH_RUNS = """
import json, sys
from prunebench.cli.command import main
for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit("failed: prunebench " + " ".join(argv))
"""


def _in_a_process(*args):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _run_argv(root, name, *extra):
    return ["run", "--grid", str(root / "grid.yaml"), "--results", str(root / name), "-q", *extra]


def _perturbed(root, name, power, jitter):
    """The argv of a fresh run of Wanda replaced by the plugin (POWER, JITTER); magnitude's cell
    is the reference's own (same key, same code), so only Wanda is computed."""
    plugin = root / f"{name}.py"
    plugin.write_text(PLUGIN.replace("POWER", str(power)).replace("JITTER", repr(jitter)))
    (root / name / "records").mkdir(parents=True)
    for rec in (root / "reference" / "records").glob("*magnitude*.json"):
        shutil.copy(rec, root / name / "records" / rec.name)
    return _run_argv(root, name, "--seeds", "0", "--plugin", str(plugin), "--replace", "wanda")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The reference (seeds 0, 1, 2) and the fresh runs at seed 0: same/, jitter/ and power2/."""
    root = tmp_path_factory.mktemp("noise")
    (root / "grid.yaml").write_text(GRID)
    _in_a_process("-m", "prunebench.cli.command", *_run_argv(root, "reference", "--seeds", "0,1,2"))
    fresh = [_run_argv(root, "same", "--seeds", "0"), _perturbed(root, "jitter", 1, 1e-6), _perturbed(root, "power2", 2, 0.0)]
    _in_a_process("-c", FRESH_RUNS, json.dumps(fresh))
    return root


def _wanda_ppl(result):
    return next(r for r in result["rows"] if r["method"] == "wanda" and r["metric"] == "ppl:lee")


def test_the_same_code_reproduces_with_identical_masks(root):
    result = compare_runs(root / "same", root / "reference")
    assert result["exit_status"] == 0, json.dumps(result["cells"])
    assert {c["masks"] for c in result["cells"]} == {"identical"}
    row = _wanda_ppl(result)
    assert row["reference_seeds"] == 3 and row["reference_sd"] > 0 and row["rule"] == "3 x seed SD"
    # the verdict between the two methods was judged from the reference's seeds (three and one)
    verdict = next(v for v in result["verdicts"] if {v["method"], v["baseline"]} == {"wanda", "magnitude"}
                   and v["metric"] == "ppl_lee")
    assert verdict["reference_seeds"] == f"{REFERENCE_SEEDS[verdict['method']]} vs {REFERENCE_SEEDS[verdict['baseline']]}"
    assert verdict["reference_significant"] is True and verdict["kept"] is True


def test_a_rounding_sized_perturbation_is_within_seed_noise(root):
    result = compare_runs(root / "jitter", root / "reference")
    wanda = next(c for c in result["cells"] if c["method"] == "wanda")
    assert result["exit_status"] == 0, json.dumps(result["rows"])
    assert wanda["status"] == "reproduced" and wanda["masks"] in ("identical", "within seed noise")


def test_a_changed_method_is_caught(root):
    result = compare_runs(root / "power2", root / "reference")
    row = _wanda_ppl(result)
    assert result["exit_status"] == 1
    assert row["within_tolerance"] is False and row["abs_diff"] > 3 * row["reference_sd"]
    assert next(c for c in result["cells"] if c["method"] == "wanda")["masks"] == "differ"
    assert main(["reproduce", "--fresh", str(root / "power2"), "--reference", str(root / "reference")]) == 1
