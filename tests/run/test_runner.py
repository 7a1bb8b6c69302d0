"""The runner and CLI end to end on tiny models: records, resume, a failing cell, the report, grid
files and presets, --require-clean, trust_remote_code.  Bad input to the command line: test_cli_bad_input.py."""
import logging
import textwrap

import pytest

from prunebench.cli.command import main
from prunebench.store.records import load_records

TINY = ["--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "lee", "--tasks", "none", "--max-ppl-windows", "16", "--seeds", "0", "-q"]


def run(*args):
    return main(["run", *args])


def _records(results):
    recs, skipped = load_records(results)
    return recs, skipped


def test_grid_writes_one_record_per_cell_and_resumes(tmp_path, capsys):
    results = tmp_path / "results"
    args = ["--models", "tiny:llama", "--methods", "magnitude,wanda", "--sparsities", "0.5,2:4", "--results", str(results), *TINY]
    assert run(*args) == 0
    recs, skipped = _records(results)
    assert not skipped and len(recs) == 5  # dense + 2 methods x 2 sparsities
    by = {(r["method"]["name"], r["sparsity"]["label"]): r for r in recs}
    assert set(by) == {("dense", "dense"), ("magnitude", "0.5"), ("magnitude", "2:4"), ("wanda", "0.5"), ("wanda", "2:4")}
    for r in recs:
        assert r["status"] == "ok"
        assert r["eval"]["perplexity"]["lee"]["seqlen"] == 64
        assert r["eval"]["perplexity"]["lee"]["n_tokens"] > 0
        assert r["timing"]["prune_s"] is not None and r["memory"]["peak_rss_mb"] > 0
        # every stage of the cell is timed; calibration only where the method reads windows
        assert all(r["timing"][stage] >= 0 for stage in ("load_s", "prune_s", "checks_s", "eval_s"))
        assert (r["timing"]["calibration_s"] is None) == (r["method"]["name"] in ("dense", "magnitude"))
        assert r["env"]["torch"] and r["model"]["n_prunable"] > 0
    assert by[("wanda", "0.5")]["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert by[("wanda", "0.5")]["sparsity"]["scope"] == "row"
    assert by[("magnitude", "0.5")]["sparsity"]["scope"] == "layer"
    assert by[("wanda", "0.5")]["calibration"]["fingerprint"]
    assert by[("dense", "dense")]["sparsity"]["achieved"] == 0.0
    mtimes = {p: p.stat().st_mtime_ns for p in (results / "records").glob("*.json")}
    capsys.readouterr()
    assert run(*args) == 0
    assert "5 skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (results / "records").glob("*.json")} == mtimes
    assert run(*args, "--force") == 0
    assert all(p.stat().st_mtime_ns != t for p, t in mtimes.items())


def test_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from prunebench import Capabilities, Pruner, register

        @register
        class Broken(Pruner):
            name = "broken_test"
            capabilities = Capabilities(patterns=("unstructured",), needs_calibration=False)

            @dataclass
            class Config:
                pass

            def prune(self, model, ctx):
                raise RuntimeError("deliberate failure")
    '''))
    results = tmp_path / "results"
    code = run("--plugin", str(plugin), "--models", "tiny:qwen2", "--methods", "broken_test,magnitude",
               "--sparsities", "0.5", "--results", str(results), *TINY)
    assert code != 0
    recs, _ = _records(results)
    status = {r["method"]["name"]: r for r in recs}
    assert status["broken_test"]["status"] == "failed" and "deliberate failure" in status["broken_test"]["error"]
    assert status["magnitude"]["status"] == "ok" and status["dense"]["status"] == "ok"


def test_report_skips_corrupt_records_and_prints_csv(tmp_path, capsys, caplog):
    results = tmp_path / "results"
    assert run("--models", "tiny:gpt2", "--methods", "magnitude,wanda", "--sparsities", "0.5", "--results", str(results), *TINY) == 0
    (results / "records" / "zz-corrupt.json").write_text('{"key": "abc", "status": "ok", ')
    capsys.readouterr()
    assert main(["report", "--results", str(results), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert "zz-corrupt.json" in captured.err + caplog.text  # named, and skipped
    header, *rows = captured.out.strip().splitlines()
    cols = header.split(",")
    for needed in ("model", "method", "sparsity", "pattern", "achieved_sparsity", "ppl_lee"):
        assert needed in cols
    assert len(rows) == 3
    assert (results / "report" / "report.md").is_file()
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in (results / "report").rglob("*.png"))


def test_list_prints_methods_with_capabilities_and_defaults(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "wanda" in out and "magnitude" in out and "patterns:" in out


def test_grid_file_rejects_unknown_keys(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: [tiny:llama]\nmethods: [wanda]\nsparsity: [0.5]\n")
    assert run("--grid", str(grid), "--results", str(tmp_path / "r"), "-q") == 2
    assert "unknown key" in capsys.readouterr().err
    grid.write_text("models: [tiny:llama]\nmethods: [wanda]\nsparsities: ['0.5']\ncalibration: {dataset: lee, n_samples: 2, seqlen: 32}\n"
                    "eval: {perplexity: [lee], seqlen: 32, tasks: [], max_ppl_windows: 16}\n")
    assert run("--grid", str(grid), "--results", str(tmp_path / "r"), "-q") == 0


def test_methods_flag_keeps_the_presets_method_config(capsys):
    """`--methods leap` on the embedded preset means the preset's CPU-sized LEAP, not the paper's."""
    from prunebench.cli.command import build_parser, grid_from_args

    args = build_parser().parse_args(["run", "--methods", "leap,wanda"])
    grid = grid_from_args(args)
    leap = next(c for c in grid.cells() if c.method == "leap")
    assert leap.method_config["preset"] == "embedded" and leap.method_config["steps"] < 2000


def test_a_method_may_bring_its_own_sparsities(tmp_path, capsys):
    from prunebench.cli.command import build_parser, grid_from_args

    grid = tmp_path / "grid.yaml"
    grid.write_text("models: [tiny:llama]\nmethods: [wanda, {name: patch, config: {preset: tiny}, "
                    "sparsities: ['hybrid:0.25/16', 'hybrid:0.45/16']}]\nsparsities: ['2:4']\n")
    cells = grid_from_args(build_parser().parse_args(["run", "--grid", str(grid)])).cells()
    assert sorted((c.method, c.sparsity.label) for c in cells) == [
        ("dense", "0"), ("patch", "hybrid:0.25/16"), ("patch", "hybrid:0.45/16"), ("wanda", "2:4")]
    grid.write_text("models: [tiny:llama]\nmethods: [{name: patch, sparsities: 'hybrid:0.25'}]\nsparsities: ['2:4']\n")
    assert run("--grid", str(grid), "--results", str(tmp_path / "r"), "-q") == 2
    assert "sparsities must be a non-empty list" in capsys.readouterr().err


def test_require_clean_refuses_uncommitted_code(tmp_path, capsys, monkeypatch):
    from prunebench.run import runner

    monkeypatch.setattr(runner, "uncommitted_code", lambda: ["methods/wanda.py"])
    assert run("--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--results",
               str(tmp_path / "r"), "--require-clean", "-q") == 2
    assert "uncommitted changes (methods/wanda.py)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# trust_remote_code: warned about, and in the key only when true

def test_trust_remote_code_is_warned_about_and_in_the_key_only_when_true(monkeypatch, caplog):
    from prunebench.run import validate
    from prunebench.run.grid import grid_from_dict

    base = {"models": ["tiny:llama"], "methods": ["magnitude"], "include_dense": False,
            "calibration": {"n_samples": 4, "seqlen": 64}, "eval": {"perplexity": ["lee"], "seqlen": 64}}
    plain = grid_from_dict(dict(base)).cells()[0]
    said_false = grid_from_dict({**base, "trust_remote_code": False}).cells()[0]
    trusted = grid_from_dict({**base, "trust_remote_code": True}).cells()[0]
    assert "trust_remote_code" not in plain.identity() and said_false.key == plain.key
    assert trusted.identity()["trust_remote_code"] is True and trusted.key != plain.key
    monkeypatch.setattr(validate, "_WARNED_REMOTE_CODE", set())
    with caplog.at_level(logging.WARNING, logger="prunebench"):
        validate.check_grid(grid_from_dict({**base, "trust_remote_code": True}))
    assert any("trust_remote_code is true" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prunebench"):
        validate.check_grid(grid_from_dict(dict(base)))
    assert not any("trust_remote_code" in r.getMessage() for r in caplog.records)


def test_trust_remote_code_is_written_into_the_record(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: [tiny:llama]\nmethods: [magnitude]\ninclude_dense: false\ntrust_remote_code: true\n")
    results = tmp_path / "results"
    assert main(["run", "--grid", str(grid), "--results", str(results), *TINY]) == 0
    assert {r["method"]["name"]: r for r in _records(results)[0]}["magnitude"]["spec"]["trust_remote_code"] is True
