"""`prunebench run --dry-run` offline on any machine (issue 35)."""
import json
import re
import socket
import urllib.request

import pytest

from prunebench.run import dryrun
from prunebench.cli.command import build_parser, grid_from_args
from prunebench.cli.command import main

NOT_CACHED = "prunebench-test/not-a-cached-model"
TINY = ["--n-samples", "4", "--seqlen", "64", "--tasks", "none", "--seeds", "0", "-q"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network is recorded and fails; the dry run's own guard sits on top
    of these, so dryrun.BLOCKED (its record) is checked as well."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("test: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face model and dataset caches and no GPU, whatever this machine holds."""
    import huggingface_hub.constants
    import torch

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    except ImportError:
        pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _grid(argv):
    """The grid the command line builds (on the embedded preset's footing, as `run` does)."""
    return grid_from_args(build_parser().parse_args(argv))


def _pending(out):
    return [line for line in out.splitlines() if line.startswith("pending")]


def test_a_hub_model_and_wikitext_without_data_are_pending_offline(tmp_path, capsys, no_network, empty_caches):
    results = tmp_path / "results"
    code = main(["run", "--models", f"{NOT_CACHED},tiny:llama", "--methods", "wanda", "--sparsities", "0.5",
                 "--calibration", "lee", "--ppl", "wikitext2", "--results", str(results), "--dry-run", *TINY])
    out = capsys.readouterr().out
    assert code == 0
    cells = out.split("\n\n")[0].splitlines()
    assert len(cells) == 4 and all(line.startswith(f"pending  {dryrun.NO_KEY}  ") for line in cells)  # no guessed key
    hub = [line for line in cells if NOT_CACHED in line]
    assert len(hub) == 2 and all(f"model {NOT_CACHED}" in line and "wikitext2 evaluation text" in line for line in hub)
    tiny = [line for line in cells if "tiny:llama" in line]
    assert all("wikitext2 evaluation text" in line and "model" not in line.split("(missing:")[1] for line in tiny)
    assert "not in the local Hugging Face cache" in out and f"hf download {NOT_CACHED}" in out
    assert re.search(r"wikitext2 evaluation text: not available offline here .*--data-dir", out)
    assert out.strip().splitlines()[-1] == "4 cells: 0 done, 0 todo, 4 pending (4 without a key until what they miss is here)"
    assert not results.exists()  # nothing written
    assert no_network == [] and dryrun.BLOCKED == []  # nothing tried to reach the network


def test_the_paper_preset_dry_runs_offline_on_a_cpu_machine(tmp_path, capsys, no_network, empty_caches):
    results = tmp_path / "results"
    assert main(["run", "--preset", "paper", "--dry-run", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    cells = _pending(out)
    assert len(cells) == 5 * (1 + 4 * 2) and all(dryrun.NO_KEY in line for line in cells)
    for needed in ("model meta-llama/Llama-3.1-8B: not in the local Hugging Face cache", "it is gated",
                   "c4 calibration text: not available offline", "wikitext2 evaluation text: not available offline",
                   "slimpajama training stream: streamed from the Hub", "GPU: device 'cuda' asked for",
                   "zero-shot task data: mmlu, piqa, arc_easy, arc_challenge, winogrande, openbookqa"):
        assert needed in out, needed
    assert "it is gated" not in next(line for line in out.splitlines() if line.startswith("  model Qwen/"))
    leap = [line for line in cells if "| leap |" in line]
    assert leap and all("slimpajama training stream" in line for line in leap)
    assert not any("slimpajama" in line for line in cells if "| wanda |" in line)
    assert not results.exists() and no_network == [] and dryrun.BLOCKED == []


def test_a_cuda_grid_lists_its_keys_on_a_machine_without_a_gpu(tmp_path, capsys, no_network, empty_caches):
    args = ["run", "--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--calibration", "lee",
            "--ppl", "lee", "--device", "cuda", "--results", str(tmp_path / "r"), *TINY]
    assert main([*args, "--dry-run"]) == 0
    cells = _pending(capsys.readouterr().out)
    grid = _grid(args)
    assert grid.device == "cuda"
    # the keys are the GPU machine's (they hold the device kind): listed, with the GPU as what is missing
    assert cells == [f"pending  {c.key[:12]}  {c.label}  (missing: GPU)" for c in grid.cells()]
    assert main(args) == 2  # a real run still refuses, in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable CUDA GPU" in err[0]


def test_a_cached_hub_model_has_a_key_and_needs_its_weights_to_run(tmp_path, capsys, no_network, empty_caches):
    import huggingface_hub.constants

    repo, commit = "prunebench-test/cached-model", "0123456789abcdef0123456789abcdef01234567"
    model_dir = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = model_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (model_dir / "refs").mkdir()
    (model_dir / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    (snapshot / "tokenizer.json").write_text("{}")
    assert huggingface_hub.constants.HF_HUB_CACHE == str(tmp_path / "hub")
    args = ["run", "--models", repo, "--methods", "magnitude", "--sparsities", "0.5", "--calibration", "lee",
            "--ppl", "lee", "--results", str(tmp_path / "r"), "--dry-run", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    keys = [c.key for c in _grid(args).cells()]  # the revision resolves from the cache: a real key
    assert _pending(out) == [f"pending  {k[:12]}  {repo} | {m} | {s} | seed 0  (missing: model {repo})"
                             for k, m, s in zip(keys, ("dense", "magnitude"), ("dense", "0.5"))]
    assert f"revision {commit[:12]} is known here but its weights or tokenizer are not in the local cache" in out
    (snapshot / "model.safetensors").write_bytes(b"")
    assert main(args) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["todo", "todo"]
    assert no_network == [] and dryrun.BLOCKED == []


def test_a_tiny_grid_still_lists_done_and_todo_as_before(tmp_path, capsys, no_network):
    results = tmp_path / "results"
    args = ["run", "--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--calibration", "lee",
            "--ppl", "lee", "--results", str(results), "--dry-run", *TINY]
    dense, magnitude = _grid(args).cells()
    # a real record of the dense cell (records are checked against their schema when read)
    assert main([a.replace("magnitude", "dense") for a in args if a != "--dry-run"]) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == [f"done  {dense.key[:12]}  {dense.label}",
                                                    f"todo  {magnitude.key[:12]}  {magnitude.label}"]
    assert no_network == [] and dryrun.BLOCKED == []


def test_offline_restores_the_network_and_the_environment(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    connect = socket.socket.__dict__.get("connect")
    with dryrun.offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        with pytest.raises(dryrun.NetworkBlocked):
            socket.getaddrinfo("huggingface.co", 443)
        with pytest.raises(dryrun.NetworkBlocked):
            socket.create_connection(("10.255.255.1", 443), timeout=1)
    assert "HF_HUB_OFFLINE" not in os.environ and socket.socket.__dict__.get("connect") is connect
    assert dryrun.BLOCKED == ["huggingface.co:443", "10.255.255.1:443"]



def _plan_total_hours(out):
    line = next(line for line in out.splitlines() if line.startswith("plan total:"))
    return float(re.search(r"cells, ([0-9.]+) GPU-hours", line).group(1)), line


def test_the_paper_dry_run_ends_with_its_plan_and_totals(tmp_path, capsys, no_network, empty_caches):
    results = tmp_path / "results"
    assert main(["run", "--preset", "paper", "--dry-run", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    plan_part = out[out.index("plan on H100-80GB"):]
    rows = [line for line in plan_part.splitlines() if " | seed 0  [" in line]
    assert len(rows) == 45 and all("?" not in line.split(" | ")[0] for line in rows)  # every paper model has a shape
    hours, total = _plan_total_hours(out)
    assert total.startswith("plan total: 45 cells,") and "45 of 45 cells estimated" in total and hours > 0
    assert "40% of peak (an assumption: --plan-utilisation)" in plan_part
    assert "a Hugging Face token with the licence accepted for google/gemma-3-1b-pt, meta-llama/Llama-3.1-8B" in plan_part
    assert "the LEAP authors report 22-276 GPU-hours per cell" in plan_part
    leap = [line for line in rows if "| leap |" in line]
    assert all("hub stream DKYoon/SlimPajama-6B" in line and "2.11B" in line for line in leap)
    # another GPU and utilisation: the same FLOPs over another peak
    assert main(["run", "--preset", "paper", "--dry-run", "--results", str(results), "--plan-gpu", "a100-80gb",
                 "--plan-utilisation", "0.5"]) == 0
    other = capsys.readouterr().out
    assert "plan on A100-80GB (312 dense bf16 TFLOPS, 80 GB" in other
    assert _plan_total_hours(other)[0] == pytest.approx(hours * (989 * 0.4) / (312 * 0.5), rel=1e-3)
    assert not results.exists() and no_network == [] and dryrun.BLOCKED == []


def test_a_cpu_grid_gets_a_plan_only_when_asked(tmp_path, capsys, no_network):
    args = ["run", "--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--calibration", "lee",
            "--ppl", "lee", "--results", str(tmp_path / "r"), "--dry-run", *TINY]
    assert main(args) == 0
    assert "plan" not in capsys.readouterr().out
    assert main([*args, "--plan-gpu", "L40S"]) == 0
    out = capsys.readouterr().out
    assert "plan on L40S" in out and "plan total: 2 cells" in out


@pytest.mark.parametrize("flags,message", [
    (["--plan-gpu", "RTX-9999"], "no plan for GPU 'RTX-9999'"),
    (["--plan-utilisation", "1.5"], "utilisation must be a fraction"),
    (["--executor", "slurm", "--nproc-per-node", "4", "--gpus-per-cell", "2"], "--gpus-per-cell gives each array task 2"),
])
def test_plan_mistakes_fail_a_dry_run_in_one_line(flags, message, tmp_path, capsys, no_network, empty_caches):
    results = tmp_path / "results"
    assert main(["run", "--preset", "paper", "--dry-run", "--results", str(results), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not results.exists()


def test_plan_options_need_a_dry_run(tmp_path, capsys):
    assert main(["run", "--models", "tiny:llama", "--methods", "magnitude", "--calibration", "lee", "--ppl", "lee",
                 "--results", str(tmp_path / "r"), "--plan-gpu", "H200", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only apply to --dry-run" in err[0] and not (tmp_path / "r").exists()


def test_every_embedded_model_is_local_not_a_hub_id():
    from prunebench.run.hub_models import is_hub_model
    from prunebench.modeling.models import EMBEDDED_MODELS

    assert EMBEDDED_MODELS and not any(is_hub_model(name) for name in EMBEDDED_MODELS)
    assert is_hub_model("google/gemma-3-1b-pt")
