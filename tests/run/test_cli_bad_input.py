"""Bad input to the command line, one table: every case ends in one line that starts
"prunebench: error:", exit status 2, no traceback, and nothing written or changed in the folder
the command was pointed at.  Flags, grid files (malformed, bombs, wrong types), plugins, models,
texts, seeds, executors, task limits and dry runs (which check a grid as a real run does) alike."""
import json

import pytest

from prunebench.cli.command import main

from tiny_runs import TINY, snapshot

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
    # a dry run into a folder that does not exist yet: a refusal must not create it
    d = lambda *extra: ["run", *m, *extra, "--dry-run", "--results", "{root}/not_created"]  # noqa: E731
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
        # executors: their options are checked before any cell, whichever executor would run it
        ("--gpus-per-cell without slurm", r("--gpus-per-cell", "1"), "only apply to --executor slurm"),
        ("slurm with --timeout 0", r("--executor", "slurm", "--timeout", "0"), "--timeout must be a positive"),
        ("slurm with --array-parallelism 0", r("--executor", "slurm", "--array-parallelism", "0"),
         "--array-parallelism must be 1 or more"),
        ("negative lock timeout", r("--lock-timeout", "-1"), "--lock-timeout must be positive"),
        ("--nproc-per-node 0", r("--nproc-per-node", "0"), "--nproc-per-node must be 1 or more"),
        # per-task limits of zero-shot tasks
        ("a task limit of 0", d("--tasks", "embedded", "--limit", "piqa=0"), "limit of piqa must be a positive number"),
        ("a limit for a task not evaluated", d("--tasks", "embedded", "--limit", "piqa=5"),
         "limit names task(s) the grid does not evaluate: piqa"),
        ("a limit that is a word", d("--tasks", "embedded", "--limit", "five"),
         "not a number of documents or task=number list"),
        # a dry run checks the grid as a real run does
        ("dry run: unknown method", d("--methods", "nosuch"), "unknown method"),
        ("dry run: sparsity 1.5", d("--sparsities", "1.5"), "outside [0, 1)"),
        ("dry run: unknown device", d("--device", "tpu"), "device"),
        ("dry run: not a model", d("--models", "not a model!"), "unknown model"),
        ("dry run: negative seed list", d("--seeds", "-1"), "outside 0 .. 2^63-1"),
        ("dry run: a word in the seeds", d("--seeds", "0,x"), "is not an integer"),
        ("dry run: an empty seed in the list", d("--seeds", "0,,1"), "'' is not an integer"),
        ("dry run: a seed twice", d("--seeds", "1,1"), "listed twice"),
        ("dry run: seed beyond int64", d("--seeds", str(2 ** 63)), "outside 0 .. 2^63-1"),
        ("dry run: empty seed list", d("--seeds", ""), "--seeds"),
    ]


CASES = _cases()


def tree(folder) -> tuple:
    """Every file with its content hash, and every folder (an empty one made by a refusal counts)."""
    return snapshot(folder), sorted(str(p) for p in folder.rglob("*") if p.is_dir())


def test_the_bad_input_table_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("what,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, capsys, what, argv, needle):
    argv = [a.replace("{root}", str(workspace)) for a in argv]
    before = tree(workspace)
    try:
        code = main([*argv, "-q"] if argv[0] in ("run", "report", "eval", "export", "list") and "--frobnicate" not in argv else argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (what, code)
    assert len(lines) == 1, (what, lines)
    assert lines[0].startswith("prunebench: error:"), (what, lines)
    assert needle in lines[0], (what, lines[0])
    assert "Traceback" not in captured.err + captured.out
    assert tree(workspace) == before, what
