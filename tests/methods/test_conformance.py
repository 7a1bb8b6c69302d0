"""Every registered pruner, on tiny models of every family: the runner's output checks (finite
weights, valid pattern, achieved sparsity at the reported scope) and the same masks from the same
seed.  The checks live in prunebench.run.conformance, which `prunebench check --plugin FILE` runs too."""
import pytest

from prunebench import registry
from prunebench.run.conformance import check_method

from conftest import TINY_FAMILIES


def _methods():
    # every registered method, and every sparsity allocation composed with a layer-wise method
    from prunebench.engines import allocation

    return [m for m in registry.available() if m != "dense"] + [f"wanda+{a}" for a in allocation.available()]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", _methods())
def test_conformance(method, family, calib_windows):
    outcomes = check_method(method, families=(family,), calibration=calib_windows)
    assert outcomes, f"{method} supports none of the conformance specs"
    failures = [o.line() for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)


def test_the_check_command_runs_the_suite_on_a_plugin(tmp_path, capsys):
    from prunebench.cli.command import main

    good = tmp_path / "keep_large.py"
    good.write_text(
        "from dataclasses import dataclass\n"
        "from prunebench import Capabilities, LayerwisePruner, LinearResult, STATS_NONE, register\n"
        "from prunebench.sparsity.patterns import mask_from_scores\n\n"
        "@register\nclass KeepLarge(LayerwisePruner):\n    name = 'keep_large_test'\n"
        "    capabilities = Capabilities(patterns=('unstructured', 'nm'), needs_calibration=False, statistics=STATS_NONE)\n"
        "    default_scope = 'layer'\n\n    @dataclass\n    class Config:\n        pass\n\n"
        "    def prune_linear(self, weight, stats, spec, ctx):\n"
        "        return LinearResult(mask=mask_from_scores(weight.abs(), spec))\n")
    assert main(["check", "--plugin", str(good), "--families", "llama,gpt2"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   keep_large_test") == 6 and "6 of 6 checks passed" in out
    bad = tmp_path / "keep_all.py"
    bad.write_text(good.read_text().replace("keep_large_test", "keep_all_test").replace("KeepLarge", "KeepAll")
                   .replace("mask_from_scores(weight.abs(), spec)", "weight != 0"))
    assert main(["check", "--plugin", str(bad), "--families", "llama"]) == 1
    assert "FAIL keep_all_test | tiny:llama | 2:4" in capsys.readouterr().out
