"""Numbers you can trust (issue 9): every method's output is checked before a record says ok,
a cell's key covers what produced it, good records are never lost, and bad input is one line."""
import hashlib
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from prunebench.cli.command import main
from prunebench.store.records import load_records

TINY = ["--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "lee", "--tasks", "none", "--max-ppl-windows", "16", "-q"]


def run(*args):
    return main(["run", *args])


def snapshot(folder: Path) -> dict:
    """Every file under a folder with its content hash (and nothing else appears or vanishes)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_plugin(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


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


def layerwise_plugin(tmp_path, name, body, cls="TestMethod"):
    return write_plugin(tmp_path / f"{name}.py", LAYERWISE_PLUGIN.format(cls=cls, name=name,
                                                                         body=textwrap.indent(textwrap.dedent(body), " " * 8)))


def by_method(results):
    recs, _ = load_records(results)
    return {(r["method"]["name"], r["sparsity"]["label"]): r for r in recs}


# ---------------------------------------------------------------------------------------------
# 1. A failing rerun never replaces an ok record

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
# 2. Every method's output is checked before ok

@pytest.mark.parametrize("body,sparsity,needle", [
    # keeps 3 of every 4: a 2:4 cell that breaks the pattern in every layer
    ("m = torch.ones_like(weight, dtype=torch.bool); m[:, ::4] = False; return LinearResult(mask=m)", "2:4", "keep more than 2"),
    # a "50%" cell that prunes nothing
    ("return LinearResult(mask=torch.ones_like(weight, dtype=torch.bool))", "0.5", "sparsity 0.0000"),
    # a mask of the wrong type
    ("return LinearResult(mask=(weight.abs() > weight.abs().median()).float())", "0.5", "bool keep-mask"),
    # NaN weights
    ("w = weight.clone(); w[0, 0] = float('nan'); return LinearResult(mask=mask_from_scores(weight.abs(), spec), weight=w)",
     "0.5", "non-finite"),
    # 60% asked, 50% delivered
    ("return LinearResult(mask=mask_from_scores(weight.abs(), SparsitySpec(0.5, scope='layer')))", "0.6", "target 0.6000"),
])
def test_a_bad_method_output_is_a_failed_record(tmp_path, body, sparsity, needle):
    name = "bad_test_" + hashlib.sha256(body.encode()).hexdigest()[:8]  # one registry per process: unique names
    plugin = layerwise_plugin(tmp_path, name, body)
    results = tmp_path / "results"
    code = run("--plugin", str(plugin), "--models", "tiny:qwen2", "--methods", f"{name},magnitude", "--sparsities",
               sparsity, "--results", str(results), *TINY)
    assert code == 1
    recs = by_method(results)
    bad = recs[(name, sparsity)]
    assert bad["status"] == "failed" and needle in bad["error"], bad["error"]
    assert "\n" not in bad["error"]
    assert recs[("magnitude", sparsity)]["status"] == "ok"  # the grid went on
    ok = recs[("magnitude", sparsity)]
    assert ok["sparsity"]["checked"]["finite"] and len(ok["sparsity"]["mask_sha256"]) == 64


def test_pattern_checks_are_a_hook(tmp_path):
    from prunebench.sparsity.checks import OutputCheckError, check_pattern
    from prunebench.sparsity.n_of_m import NOfM
    from prunebench.sparsity.pattern_registry import register_pattern
    from prunebench.sparsity.patterns import SparsitySpec
    import torch

    spec = SparsitySpec.parse("2:4")
    good = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4]])
    check_pattern([("w", good)], spec)
    with pytest.raises(OutputCheckError, match="keep more than 2"):
        check_pattern([("w", torch.ones(1, 8))], spec)
    calls = []

    class Lenient(NOfM):
        def check(self, name, kept, spec):
            calls.append(name)
            return None

    builtin = register_pattern(Lenient())
    try:
        check_pattern([("w", torch.ones(1, 8))], spec)  # the replacement pattern's check decides now
        assert calls == ["w"]
    finally:
        register_pattern(builtin)


# ---------------------------------------------------------------------------------------------
# 3. A plugin may not take a built-in's name unless asked

HIJACK = '''
from dataclasses import dataclass
import torch
from prunebench import Capabilities, LayerwisePruner, LinearResult, STATS_NONE, register
from prunebench.sparsity.patterns import mask_from_scores

@register
class Wanda(LayerwisePruner):
    name = "wanda"
    capabilities = Capabilities(patterns=("unstructured",), needs_calibration=False, statistics=STATS_NONE)
    default_scope = "row"

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
        return LinearResult(mask=mask_from_scores(-weight.abs(), spec))
'''


def test_a_plugin_that_takes_a_builtin_name_is_refused(tmp_path, capsys):
    plugin = write_plugin(tmp_path / "hijack.py", HIJACK)
    results = tmp_path / "results"
    base = ["--models", "tiny:llama", "--methods", "wanda", "--sparsities", "0.5", "--no-dense", "--results", str(results), *TINY]
    assert run("--plugin", str(plugin), *base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already taken" in err[0] and "--replace wanda" in err[0]
    assert not results.exists()
    from prunebench import registry

    assert registry.origin("wanda")["kind"] == "builtin"


def test_an_explicit_replace_carries_the_plugins_identity(tmp_path, capsys):
    import subprocess
    import sys

    plugin = write_plugin(tmp_path / "hijack.py", HIJACK)
    results = tmp_path / "results"
    base = ["--models", "tiny:llama", "--methods", "wanda", "--sparsities", "0.5", "--no-dense", "--results", str(results), *TINY]
    # A fresh process: --replace changes the registry for the rest of the process.
    code = subprocess.run([sys.executable, "-m", "prunebench.cli.command", "run", "--plugin", str(plugin), "--replace", "wanda", *base],
                          capture_output=True, text=True, env={**os.environ, "PRUNEBENCH_NO_PROGRESS": "1"})
    assert code.returncode == 0, code.stderr
    rec = by_method(results)[("wanda", "0.5")]
    ident = rec["spec"]["method_identity"]
    assert ident["kind"] == "plugin" and ident["replaces_builtin"] and ident["file"] == str(plugin.resolve())
    # Without the plugin, the built-in Wanda's cell is a different cell: not "already done".
    capsys.readouterr()
    assert run(*base, "--dry-run") == 0
    assert capsys.readouterr().out.startswith("todo")


# ---------------------------------------------------------------------------------------------
# 4. A diverged cell is valid JSON and every report renders it

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


# ---------------------------------------------------------------------------------------------
# 5. Other text under the same dataset name is another cell

def _wikitext_dir(root: Path, text: str) -> Path:
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(text)
    return root


def test_other_text_in_the_data_directory_makes_a_new_cell(tmp_path, capsys):
    from prunebench.data.windows import lee_documents

    docs = lee_documents()
    a = _wikitext_dir(tmp_path / "a", "\n".join(docs[200:230]))
    b = _wikitext_dir(tmp_path / "b", "\n".join(docs[230:260]))
    a_copy = _wikitext_dir(tmp_path / "a_copy", "\n".join(docs[200:230]))
    results = tmp_path / "results"
    base = ["--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--results", str(results),
            "--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "wikitext2", "--tasks", "none", "-q"]
    assert run(*base, "--data-dir", str(a)) == 0
    capsys.readouterr()
    assert run(*base, "--data-dir", str(a_copy), "--dry-run") == 0  # same content elsewhere: same cells
    assert all(line.startswith("done") for line in capsys.readouterr().out.strip().splitlines())
    assert run(*base, "--data-dir", str(b), "--dry-run") == 0  # other text, same name: new cells
    assert all(line.startswith("todo") for line in capsys.readouterr().out.strip().splitlines())
    assert run(*base, "--data-dir", str(b)) == 0
    recs, _ = load_records(results)
    assert len(recs) == 4
    shas = {r["eval"]["perplexity"]["wikitext2"]["text"]["sha256"] for r in recs}
    assert len(shas) == 2


def test_any_text_file_or_folder_as_evaluation_data(tmp_path):
    from prunebench.data.windows import lee_documents

    docs = lee_documents()
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs[250:270]):
        (folder / f"doc{i:02d}.txt").write_text(d)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("Caf\xe9 na\xefve " + " ".join(docs[270:280])).encode("latin-1"))
    results = tmp_path / "results"
    assert run("--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--results", str(results),
               "--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", f"{folder},{latin}",
               "--encoding", "latin-1", "--tasks", "none", "-q") == 0
    rec = by_method(results)[("magnitude", "0.5")]
    ppl = rec["eval"]["perplexity"]
    assert ppl[str(folder)]["text"]["n_documents"] == 20 and len(ppl[str(folder)]["text"]["files"]) == 20
    assert ppl[str(latin)]["text"]["encoding"] == "latin-1" and ppl[str(latin)]["value"] > 0
    assert "windows of 64 tokens" in ppl[str(latin)]["scored"]


# ---------------------------------------------------------------------------------------------
# 6. Bad input: one line, a non-zero exit, nothing written or changed

SYNTAX_ERROR_PLUGIN = "from prunebench import register\n\ndef broken(:\n    pass\n"
IMPORT_ERROR_PLUGIN = "import os\nimport no_such_module_for_prunebench\n"
EMPTY_PLUGIN = "from prunebench import Pruner\n\nclass Forgotten(Pruner):  # no @register\n    name = 'forgotten'\n"


def alias_bomb(levels: int, indent: str) -> str:
    """`levels` anchors of ten aliases each: 10**levels items once expanded, a few lines as text."""
    lines = [f"{indent}a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    results = root / "results"
    (results / "records").mkdir(parents=True)
    (results / "records" / "existing.json").write_text(json.dumps({"key": "k" * 64, "status": "ok"}))
    grids = root / "grids"
    grids.mkdir()
    files = {
        "list.yaml": "- models\n- methods\n",
        "scalar.yaml": "42\n",
        "noname.yaml": "models: [tiny:llama]\nmethods: [{config: {}}]\n",
        "intmodel.yaml": "models: [123]\nmethods: [magnitude]\n",
        "badtype.yaml": "models: [tiny:llama]\nmethods: [{name: admm, config: {iterations: many}}]\n",
        "badkey.yaml": "models: [tiny:llama]\nmethods: [{name: admm, config: {iteratons: 3}}]\n",
        "invalid.yaml": "models: [tiny:llama\nmethods: magnitude\n",
        "evallist.yaml": "models: [tiny:llama]\nmethods: [magnitude]\neval: [lee]\n",
        "cfglist.yaml": "models: [tiny:llama]\nmethods: [{name: admm, config: [1, 2]}]\n",
        "seqlen_str.yaml": "models: [tiny:llama]\nmethods: [magnitude]\ncalibration: {seqlen: long}\n",
        # 10**7 items once expanded (the 10**9 grew past 2.5 GB when the grid was copied)
        "bomb_config.yaml": "models: [tiny:llama]\nmethods:\n  - name: admm\n    config:\n      iterations:\n"
                            + alias_bomb(7, "        "),
        "bomb_models.yaml": "methods: [magnitude]\nmodels:\n" + alias_bomb(7, "  "),
        "dupkey.yaml": "models: [tiny:llama]\nmethods: [magnitude]\nsparsities: ['0.5']\nmethods: [wanda]\n",
        "dupkey_config.yaml": "models: [tiny:llama]\nmethods: [{name: admm, config: {iterations: 3, iterations: 4}}]\n",
        "selfref.yaml": "models: [tiny:llama]\nmethods: &m [magnitude, *m]\n",
        "deep.yaml": "models: [tiny:llama]\nmethods: [magnitude]\nextra: " + "[" * 2000 + "]" * 2000 + "\n",
        "huge.yaml": "models: [tiny:llama]\nmethods: [magnitude]\n# " + "x" * (1 << 20) + "\n",
        "bigseed.yaml": f"models: [tiny:llama]\nmethods: [magnitude]\nseeds: [{2 ** 63}]\n",
    }
    for name, text in files.items():
        (grids / name).write_text(text)
    (grids / "latin1.yaml").write_bytes("models: [tiny:llama]\nmethods: [magnitude]\n# caf\xe9\n".encode("latin-1"))
    (root / "empty_plugin.py").write_text(EMPTY_PLUGIN)
    (root / "no_model").mkdir()
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text("{}")
    (root / "empty.txt").write_text("")
    # a real masks file and its record, for eval and export
    assert main(["run", "--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--no-dense",
                 "--save-masks", "--results", str(root / "masked"), *TINY]) == 0
    (root / "real.masks.safetensors").write_bytes(next((root / "masked").rglob("*.masks.safetensors")).read_bytes())
    (root / "syntax.py").write_text(SYNTAX_ERROR_PLUGIN)
    (root / "importerr.py").write_text(IMPORT_ERROR_PLUGIN)
    (root / "a_file").write_text("not a directory")
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "masks.safetensors").write_bytes(b"")
    return root


def _cases():
    m = ["--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5"]
    g = lambda name: ["run", "--grid", f"{{root}}/grids/{name}", "--results", "{root}/results"]  # noqa: E731
    r = lambda *extra: ["run", *m, *extra, "--results", "{root}/results"]  # noqa: E731
    return [
        ("unknown method", ["run", "--models", "tiny:llama", "--methods", "nosuch", "--results", "{root}/results"], "known methods"),
        ("unknown model", r("--models", "nosuchmodel"), "unknown model"),
        ("unknown tiny family", r("--models", "tiny:nosuch"), "tiny model family"),
        ("sparsity 1.0", r("--sparsities", "1.0"), "outside [0, 1)"),
        ("sparsity 4:4", r("--sparsities", "4:4"), "N must be smaller than M"),
        ("bad scope", r("--sparsities", "0.5@diagonal"), "scope"),
        ("sparsity text", r("--sparsities", "half"), "cannot read sparsity"),
        ("missing data dir", r("--data-dir", "/nonexistent/dir"), "not a readable directory"),
        ("empty --methods", r("--methods", ""), "--methods '' names nothing"),
        ("empty --sparsities", r("--sparsities", ","), "--sparsities ',' names nothing"),
        ("empty --models", r("--models", ""), "--models '' names nothing"),
        ("nothing to evaluate", r("--ppl", "", "--tasks", "none"), "evaluates nothing"),
        ("seqlen over positions", r("--seqlen", "100000"), "position limit of 512"),
        ("seqlen 1", r("--seqlen", "1"), "at least 2"),
        ("n-samples 0", r("--n-samples", "0"), "positive integer"),
        ("n-samples not a number", r("--n-samples", "abc"), "invalid int value"),
        ("batch size 0", r("--batch-size", "0"), "batch_size"),
        ("limit 0", r("--tasks", "embedded", "--limit", "0"), "limit must be"),
        ("cuda on a CPU machine", r("--device", "cuda", "--force"), "CUDA"),
        ("unknown device", r("--device", "tpu"), "device"),
        ("unknown dtype", r("--dtype", "float8"), "unknown dtype"),
        ("unknown calibration set", r("--calibration", "nosuchset"), "unknown dataset"),
        ("unknown ppl set", r("--ppl", "nosuchset"), "unknown dataset"),
        ("missing ppl file", r("--ppl", "/nonexistent/file.txt"), "no such text file"),
        ("unknown task", r("--tasks", "nosuchtask_xyz"), "unknown zero-shot task"),
        ("negative seed", r("--seed", "-1"), "seed"),
        ("empty seed list", r("--seeds", ""), "--seeds"),
        ("negative seed in a list", r("--seeds", "0,-2"), "outside 0 .. 2^63-1"),
        ("non-integer seed", r("--seeds", "0,1.5"), "is not an integer"),
        ("seed beyond int64", r("--seeds", str(2 ** 63)), "outside 0 .. 2^63-1"),
        ("duplicated seed", r("--seeds", "1,2,1"), "listed twice"),
        ("--seed and --seeds", r("--seed", "1", "--seeds", "1"), "not both"),
        ("600-character model", r("--models", "x" * 600), "too long"),
        ("grid is a list", g("list.yaml"), "must be a mapping"),
        ("grid is a scalar", g("scalar.yaml"), "must be a mapping"),
        ("method without name", g("noname.yaml"), "has no name"),
        ("model is a number", g("intmodel.yaml"), "must be a string"),
        ("config value of the wrong type", g("badtype.yaml"), "iterations must be an integer"),
        ("unknown config key", g("badkey.yaml"), "unknown option"),
        ("invalid YAML", g("invalid.yaml"), "not valid YAML"),
        ("missing grid file", g("nosuch.yaml"), "cannot read grid file"),
        ("eval section is a list", g("evallist.yaml"), "must be a mapping"),
        ("config is a list", g("cfglist.yaml"), "config must be a mapping"),
        ("seqlen is a word", g("seqlen_str.yaml"), "seqlen must be an integer"),
        ("plugin syntax error", ["run", "--plugin", "{root}/syntax.py", *m, "--results", "{root}/results"], "syntax.py, line 3"),
        ("plugin import error", ["run", "--plugin", "{root}/importerr.py", *m, "--results", "{root}/results"], "importerr.py, line 2"),
        ("missing plugin", ["run", "--plugin", "{root}/nosuch.py", *m, "--results", "{root}/results"], "does not exist"),
        ("results is a file", ["run", *m, "--results", "{root}/a_file"], "is a file"),
        ("results cannot be created", ["run", *m, "--results", "/proc/prunebench-results"], "cannot create results directory"),
        ("grid and preset", ["run", "--grid", "{root}/grids/list.yaml", "--preset", "embedded", "--results", "{root}/results"],
         "not both"),
        ("unknown preset", ["run", "--preset", "nosuch", "--results", "{root}/results"], "unknown preset"),
        ("slurm option with local executor", r("--slurm-partition", "gpu"), "only apply to --executor slurm"),
        ("lock timeout 0", r("--lock-timeout", "0"), "--lock-timeout must be positive"),
        ("unknown encoding", r("--ppl", "{root}/latin.txt", "--encoding", "nosuch-enc"), "unknown text encoding"),
        ("undecodable text", r("--ppl", "{root}/latin.txt"), "not valid utf-8"),
        ("pattern the method lacks", ["run", "--models", "tiny:llama", "--methods", "leap", "--sparsities", "2:4",
                                      "--results", "{root}/results"], "does not support the 2:4 pattern"),
        ("eval batch size 0", ["eval", "--masks", "{root}/masks.safetensors", "--batch-size", "0"], "--batch-size must be 1"),
        ("eval max-windows 0", ["eval", "--masks", "{root}/masks.safetensors", "--max-windows", "0"], "--max-windows must be 1"),
        ("eval missing masks", ["eval", "--masks", "{root}/nosuch.safetensors"], "does not exist"),
        ("eval bad device", ["eval", "--masks", "{root}/masks.safetensors", "--device", "cuda:7"], "device"),
        ("export out is a file", ["export", "--results", "{root}/results", "--key", "k", "--out", "{root}/a_file"], "is a file"),
        ("export missing results", ["export", "--results", "{root}/nosuch", "--key", "k", "--out", "{root}/o"], "does not exist"),
        ("report missing results", ["report", "--results", "{root}/nosuch"], "does not exist"),
        ("report results is a file", ["report", "--results", "{root}/a_file"], "is a file"),
        ("unknown subcommand option", ["list", "--frobnicate"], "unrecognized arguments"),
        # issue 29: bounded work on bad input, environment failures in one line
        ("YAML alias bomb in a method config", g("bomb_config.yaml"), "aliases expand it past"),
        ("YAML alias bomb in the models", g("bomb_models.yaml"), "aliases expand it past"),
        ("duplicated YAML key", g("dupkey.yaml"), "key 'methods' is given twice"),
        ("duplicated key in a method config", g("dupkey_config.yaml"), "key 'iterations' is given twice"),
        ("YAML alias inside itself", g("selfref.yaml"), "refers to a node that contains it"),
        ("YAML nested too deeply", g("deep.yaml"), "nests deeper than"),
        ("grid file over the size limit", g("huge.yaml"), "is larger than"),
        ("grid file not UTF-8", g("latin1.yaml"), "not valid YAML"),
        ("seed beyond int64 in a grid file", g("bigseed.yaml"), "outside 0 .. 2^63-1"),
        ("folder without a model", r("--models", "{root}/no_model"), "holds no model: it has no config.json"),
        ("folder without weights", r("--models", "{root}/no_weights"), "holds no model weights"),
        ("plugin that registers nothing", ["run", "--plugin", "{root}/empty_plugin.py", *m, "--results", "{root}/results"],
         "registers no method"),
        ("--replace a name no plugin registers", r("--replace", "wanda"), "--replace wanda: no --plugin registers"),
        ("--timeout 0", r("--timeout", "0"), "--timeout must be a positive number of minutes"),
        ("--timeout nan", r("--timeout", "nan"), "--timeout must be a positive number of minutes"),
        ("eval of an empty text", ["eval", "--masks", "{root}/real.masks.safetensors", "--ppl", "{root}/empty.txt",
                                   "--seqlen", "64"], "the text has 0 tokens"),
        ("export into an unwritable place", ["export", "--results", "{root}/masked", "--model", "tiny:llama", "--method",
                                             "magnitude", "--sparsity", "0.5", "--out", "{root}/a_file/out"],
         "cannot export to"),
    ]


CASES = _cases()


def test_the_bad_input_table_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("what,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(workspace, capsys, what, argv, needle):
    argv = [a.replace("{root}", str(workspace)) for a in argv]
    before = snapshot(workspace)
    try:
        code = main([*argv, "-q"] if argv[0] in ("run", "report", "eval", "export", "list") and "--frobnicate" not in argv else argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code not in (0, None), what
    assert len(lines) == 1, (what, lines)
    assert lines[0].startswith("prunebench: error:"), (what, lines)
    assert needle in lines[0], (what, lines[0])
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(workspace) == before, what
