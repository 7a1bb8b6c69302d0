"""Good records are never lost and every record stays valid JSON: a failing rerun keeps the ok
record (the attempt beside it), a full disk stops the run in one line with every record intact,
and a diverged cell (NaN losses, infinite perplexity) is strict JSON that every report renders."""
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from prunebench.cli.command import main

from tiny_runs import TINY, by_method, layerwise_plugin, run, snapshot, write_plugin


def files_under(folder: Path) -> dict:
    """Every file (claims aside) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


# ---------------------------------------------------------------------------------------------
# A failing rerun never replaces an ok record

def test_failed_force_rerun_keeps_the_ok_record(tmp_path, capsys):
    results = tmp_path / "results"
    args = ["--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--results", str(results), *TINY]
    assert run(*args) == 0
    before = snapshot(results / "records")
    # The case: --force with a device this machine lacks. It is refused up front now.
    if not __import__("torch").cuda.is_available():
        assert run(*args, "--force", "--device", "cuda") == 2
        assert "no usable CUDA GPU" in capsys.readouterr().err
        assert snapshot(results / "records") == before


def test_failure_during_a_forced_rerun_keeps_ok_and_the_attempt_beside_it(tmp_path, monkeypatch, capsys):
    plugin = layerwise_plugin(tmp_path, "flaky_test", '''
        import os
        if os.environ.get("PB_TEST_FAIL"):
            raise RuntimeError("deliberate failure on rerun")
        return LinearResult(mask=mask_from_scores(weight.abs(), spec))
    ''')
    results = tmp_path / "results"
    args = ["--plugin", str(plugin), "--models", "tiny:llama", "--methods", "flaky_test", "--sparsities", "0.5",
            "--no-dense", "--results", str(results), *TINY]
    assert run(*args) == 0
    ok = by_method(results)[("flaky_test", "0.5")]
    ok_text = Path(ok["_path"]).read_text()
    monkeypatch.setenv("PB_TEST_FAIL", "1")
    assert run(*args, "--force") == 1
    recs = by_method(results)
    kept = recs[("flaky_test", "0.5")]
    assert kept["status"] == "ok" and Path(kept["_path"]).read_text() == ok_text
    attempts = list((results / "records" / "attempts").glob("*.failed.json"))
    assert len(attempts) == 1 and "deliberate failure" in json.loads(attempts[0].read_text())["error"]
    assert kept["_last_attempt"]["status"] == "failed"
    capsys.readouterr()
    assert main(["report", "--results", str(results), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "last_attempt_status" in out.splitlines()[0] and "failed" in out.splitlines()[1]
    # A later successful run replaces it, and the superseded ok record is kept too.
    monkeypatch.delenv("PB_TEST_FAIL")
    assert run(*args, "--force") == 0
    assert by_method(results)[("flaky_test", "0.5")]["_last_attempt"]["status"] == "ok"
    assert len(list((results / "records" / "attempts").glob("*.ok.json"))) == 1


# ---------------------------------------------------------------------------------------------
# A full disk: one line naming the path and the cause; no masks file without its record

def _full_disk_on(monkeypatch, what: str):
    """Make the record write (or the masks write) fail as a full disk does."""
    from prunebench.store import records

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if what == "record":
        real = records.atomic_write_text

        def write(path, text):
            if Path(path).parent.name == "records" and str(path).endswith(".json"):
                no_space(path)
            return real(path, text)

        monkeypatch.setattr(records, "atomic_write_text", write)
    else:
        import safetensors.torch

        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a file")  # what a full disk leaves behind
            no_space(filename)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("what", ["record", "masks"])
def test_a_full_disk_is_one_line_and_keeps_every_record(tmp_path, monkeypatch, capsys, what):
    results = tmp_path / "results"
    # a finished cell first: it must come through untouched
    assert main(["run", "--models", "tiny:llama", "--methods", "magnitude", "--results", str(results), *TINY]) == 0
    before = files_under(results / "records")
    assert any(name.endswith(".json") for name in before)
    capsys.readouterr()
    _full_disk_on(monkeypatch, what)
    code = main(["run", "--models", "tiny:llama", "--methods", "magnitude,wanda", "--save-masks",
                 "--results", str(results), *TINY])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prunebench: error: cannot write ") and "No space left on device" in err[0]
    assert str(results / "records") in err[0]  # the path
    assert files_under(results / "records") == before  # no new masks file, no half file, old records intact


# ---------------------------------------------------------------------------------------------
# A diverged cell is valid JSON and every report renders it

DIVERGE = '''
from dataclasses import dataclass
import torch
from prunebench.modeling.models import all_prunable, weight_matrix, set_weight_matrix
from prunebench import Capabilities, Pruner, PruneReport, register
from prunebench.sparsity.patterns import mask_from_scores

@register
class Diverge(Pruner):
    name = "diverge_test"
    capabilities = Capabilities(patterns=("unstructured",), needs_calibration=False)

    @dataclass
    class Config:
        pass

    def prune(self, model, ctx):
        for name, m in all_prunable(model).items():
            w = weight_matrix(m)
            set_weight_matrix(m, w * mask_from_scores(w.abs(), ctx.sparsity.resolved("row")))
        return PruneReport(stats={"scope": "row", "loss_curve": [1.0, float("nan"), float("inf")]})
'''


def test_a_nan_loss_cell_is_valid_json_and_renders_as_diverged(tmp_path, capsys, monkeypatch):
    import prunebench.run.runner as runner

    real = runner.perplexity

    def diverging(model, *args, **kwargs):
        # Logits that overflow every window's NLL.  The output checks let no method's weights do
        # this (kept weights stay the dense ones unless declared updates, and then bounded), so
        # the evaluation scales the output head here, through the real perplexity code (which
        # applies the head's weight block by block, not through the module's forward).
        head = model.get_output_embeddings().weight
        saved = head.detach().clone()
        with torch.no_grad():
            head.mul_(1e30)
        try:
            return real(model, *args, **kwargs)
        finally:
            with torch.no_grad():
                head.copy_(saved)

    monkeypatch.setattr(runner, "perplexity", diverging)
    plugin = write_plugin(tmp_path / "diverge.py", DIVERGE)
    results = tmp_path / "results"
    assert run("--plugin", str(plugin), "--models", "tiny:llama", "--methods", "diverge_test,magnitude", "--sparsities", "0.5",
               "--results", str(results), *TINY) == 0
    rec = by_method(results)[("diverge_test", "0.5")]
    text = Path(rec["_path"]).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a record"))  # strict JSON
    assert rec["status"] == "ok"
    assert rec["eval"]["perplexity"]["lee"]["diverged"] is True and rec["eval"]["perplexity"]["lee"]["value"] is None
    assert rec["method"]["stats"]["loss_curve"] == [1.0, None, None]
    assert any("non-finite values stored as null" in w for w in rec["warnings"])
    # A record written by an older prunebench with a bare Infinity must not break the report either.
    old = json.loads(text)
    old["key"] = "f" * 64
    old["eval"]["perplexity"]["lee"]["value"] = float("inf")
    (results / "records" / "old-infinity.json").write_text(json.dumps(old))
    for fmt in ("md", "csv", "latex"):
        capsys.readouterr()
        assert main(["report", "--results", str(results), "--format", fmt]) == 0
        assert "diverged" in capsys.readouterr().out, fmt
