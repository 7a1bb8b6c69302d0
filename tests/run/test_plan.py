"""The plan's arithmetic (prunebench/run/plan.py), the checks made before a grid runs, and the
up-front refusal of a training stream that cannot supply a preset's tokens (issue 35)."""
import json
import sys
from pathlib import Path

import pytest

from prunebench.run import plan
from prunebench import registry
from prunebench.cli.command import build_parser, grid_from_args, main
from prunebench.errors import UserError
from prunebench.data.stream import HUB_TOKENS, WindowStream, check_supply, open_documents, stream_supply

from conftest import REPO

# Parameter counts the model cards publish (billions).
PUBLISHED_PARAMS = {"Qwen/Qwen2.5-0.5B": 0.49, "google/gemma-3-1b-pt": 1.0, "meta-llama/Llama-3.2-1B": 1.24,
                    "meta-llama/Llama-3.2-3B": 3.21, "meta-llama/Llama-3.1-8B": 8.03}
SAMPLE = Path("slimpajama") / "redpajama1t_sample_llmshearing"


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def small_data_dir(tmp_path):
    """A --data-dir with a few kB of streamable shards, laid out like shared/data."""
    root = tmp_path / "data"
    words = " ".join(f"word{i}" for i in range(400))
    write_jsonl(root / SAMPLE / "wiki" / "sample_wiki1.jsonl", [words] * 3)
    write_jsonl(root / "c4" / "c4-train.00000-of-01024.first1000.jsonl", [words] * 2)
    return root


def test_the_paper_shapes_give_the_published_parameter_counts():
    for spec, billions in PUBLISHED_PARAMS.items():
        arch = plan.arch_for(spec)
        assert abs(arch.params / 1e9 - billions) / billions < 0.02, spec


def test_a_config_on_this_machine_gives_the_shape():
    from prunebench.modeling.models import tiny_config

    arch = plan.arch_for("tiny:llama")
    config = tiny_config("llama", vocab_size=257)
    assert (arch.hidden, arch.intermediate, arch.layers, arch.heads, arch.kv_heads) == (64, 128, 2, 4, 2)
    assert arch.masked == sum(m.numel() for n, m in _linears(config))
    assert plan.arch_for("tiny:gpt2").mlp_matrices == 2
    assert plan.arch_for("prunebench-test/not-cached") is None  # nothing downloaded


def _linears(config):
    from transformers import AutoModelForCausalLM

    from prunebench.modeling.models import all_prunable

    model = AutoModelForCausalLM.from_config(config)
    return [(n, m.weight) for n, m in all_prunable(model).items()]


def test_training_memory_adds_its_terms_and_shards_what_the_engine_shards():
    arch = plan.PAPER_ARCHS["meta-llama/Llama-3.1-8B"]
    one = plan.training_memory(arch, 1.0, micro_tokens=4096)
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k not in ("total", "checkpoint")))
    assert one["logits"] == arch.masked * 2 and one["optimizer"] == 2 * arch.masked * 2  # bf16 moments, as the engine keeps them
    ddp = plan.training_memory(arch, 1.0, micro_tokens=4096, gpus=4)
    zero = plan.training_memory(arch, 1.0, micro_tokens=4096, gpus=4, shard="optimizer")
    fsdp = plan.training_memory(arch, 1.0, micro_tokens=4096, gpus=4, shard="logits")
    assert ddp["total"] == one["total"]  # DDP replicates everything
    assert zero["optimizer"] == one["optimizer"] / 4 and zero["logits"] == one["logits"]
    assert fsdp["logits"] == fsdp["grads"] == one["logits"] / 4 and fsdp["optimizer"] == one["optimizer"] / 4
    eight = plan.training_memory(arch, 1.0, micro_tokens=4096, state_dtype="8bit")
    assert eight["optimizer"] == pytest.approx(2 * arch.masked * (1 + 4 / 256))
    chunked = plan.training_memory(arch, 1.0, micro_tokens=4096, loss_chunk=512)
    assert chunked["loss"] == one["loss"] / 8
    assert plan.training_memory(arch, 1.0, micro_tokens=4096, checkpointing=False)["activations"] > one["activations"]
    assert plan.logits_per_weight("maskllm", registry_spec("2:4")) == 1.5
    assert plan.logits_per_weight("patch", registry_spec("hybrid:0.35/64"), {"mode": "tile"}) == 1 / 64 ** 2
    assert plan.logits_per_weight("patch", registry_spec("hybrid:0.35/64")) == 1.5 + 1 / 64 ** 2
    assert plan.logits_per_weight("leap") == 1.0


def test_every_cost_the_plan_uses_is_the_methods_own_or_said_to_be_assumed():
    """The plan reads each method's measured ratio from the method (no table of names); one that
    has none is planned at the most expensive measured method of its kind, with a note."""
    from prunebench import registry

    assert plan.measured_cost_ratio(registry.create("sparsegpt")) == (1.65, None)
    ratio, note = plan.measured_cost_ratio(registry.create("thanos"))
    slowest = max(registry.get(m).cost_ratio for m in registry.available()
                  if registry.get(m).kind == "layer-wise" and registry.get(m).cost_ratio is not None)
    assert ratio == slowest and note.startswith("thanos's pruning cost is unmeasured: taken as")
    ratio, note = plan.measured_cost_ratio(registry.create("maskllm"))
    assert ratio == registry.get("leap").cost_ratio and "maskllm's step cost is unmeasured" in note


def registry_spec(text):
    from prunebench.sparsity.patterns import SparsitySpec

    return SparsitySpec.parse(text)


def test_the_memory_benchmark_prints_the_library_arithmetic():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import learned_memory_plan as bench
    finally:
        sys.path.pop(0)
    arch = plan.PAPER_ARCHS["google/gemma-3-1b-pt"]
    assert bench.plan(arch, "patch", state_dtype="fp32", gpus=4, chunked_loss=True) == plan.training_memory(
        arch, plan.logits_per_weight("patch"), micro_tokens=4096, state_dtype="fp32", gpus=4, shard="logits",
        loss_chunk=512)


def _paper_grid(*flags):
    return grid_from_args(build_parser().parse_args(["run", "--preset", "paper", *flags]))


def test_a_paper_leap_cell_reads_the_papers_tokens_and_costs_its_flops():
    grid = _paper_grid("--models", "meta-llama/Llama-3.1-8B", "--methods", "leap", "--sparsities", "0.5",
                       "--no-dense")
    (cell,) = grid.cells()
    card = plan.gpu("h100-80gb")
    p = plan.plan_cell(grid, cell, card, 0.4)
    assert p.tokens["training"] == (2000 * 256 + 16) * 4096 and p.tokens["calibration"] == 128 * 2048
    arch = plan.PAPER_ARCHS["meta-llama/Llama-3.1-8B"]
    train = 1.08 * (3 + 1) * 2000 * 256 * 4096 * arch.forward_flops(4096)  # measured ratio, checkpointing
    assert train < p.flops < 1.01 * train  # the rest (prior, held-out, evaluation) is small
    assert p.gpu_hours == pytest.approx(p.flops / (989e12 * 0.4) / 3600)
    assert p.peak_phase == "training" and 70 * plan.GB < p.peak_bytes < 90 * plan.GB
    assert "token+licence meta-llama/Llama-3.1-8B" in p.access and "hub stream DKYoon/SlimPajama-6B" in p.access
    # twice the utilisation, half the hours; an A100 has a third of the H100's peak
    assert plan.plan_cell(grid, cell, card, 0.8).gpu_hours == pytest.approx(p.gpu_hours / 2)
    assert plan.plan_cell(grid, cell, plan.gpu("A100-80GB"), 0.4).gpu_hours == pytest.approx(p.gpu_hours * 989 / 312)
    four = plan.plan_cell(grid, cell, card, 0.4, nproc=4)
    assert four.gpus == 4 and four.peak_bytes == p.peak_bytes  # DDP: nothing sharded without shard_* set


def test_unknown_gpus_and_utilisations_are_refused():
    with pytest.raises(UserError, match="no plan for GPU 'RTX-9999'"):
        plan.gpu("RTX-9999")
    for bad in (0, 1.5, -0.1, True, "0.4"):
        with pytest.raises(UserError):
            plan.check_utilisation(bad)


def test_the_gpu_count_must_fit_what_the_executor_gives():
    plan.check_gpu_count("cpu", "slurm", 4, None)  # gloo processes need no GPU
    plan.check_gpu_count("cuda", "slurm", 4, 4)
    plan.check_gpu_count("cuda", "local", 4, None, available=None)  # unknown here (a dry run)
    with pytest.raises(UserError, match="--gpus-per-cell gives each array task 2"):
        plan.check_gpu_count("cuda", "slurm", 4, 2)
    with pytest.raises(UserError, match="gives each array task 0"):
        plan.check_gpu_count("cuda:0", "slurm", 1, None)
    with pytest.raises(UserError, match="this machine has 2"):
        plan.check_gpu_count("cuda", "local", 4, None, available=2)


def test_a_gated_model_needs_a_token_unless_it_is_cached(monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    grid = _paper_grid("--models", "Qwen/Qwen2.5-0.5B,meta-llama/Llama-3.2-1B")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="meta-llama/Llama-3.2-1B is gated and no Hugging Face token"):
        plan.check_model_access(grid)
    plan.check_model_access(_paper_grid("--models", "Qwen/Qwen2.5-0.5B"))  # not gated
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    plan.check_model_access(grid)


def test_a_real_run_of_a_gated_model_without_a_token_stops_in_one_line(monkeypatch, tmp_path, capsys):
    import socket

    import huggingface_hub
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("test: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)  # the config lookup fails fast, as offline
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    results = tmp_path / "results"
    code = main(["run", "--models", "meta-llama/Llama-3.2-1B", "--methods", "magnitude", "--sparsities", "0.5",
                 "--calibration", "lee", "--ppl", "lee", "--tasks", "none", "--seeds", "0", "--device", "cpu",
                 "--results", str(results), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is gated and no Hugging Face token" in err[0]
    assert not results.exists()


# -- deliverable 3: a stream that cannot supply the preset's tokens ------------------------------

@pytest.mark.parametrize("method", ["leap", "maskllm", "patch"])
def test_the_paper_presets_refuse_a_local_stream_too_small_for_their_tokens(method, small_data_dir):
    config = registry.create(method, {"preset": "paper"}).config
    supply = stream_supply(config.dataset, small_data_dir)
    assert supply.bound and 0 < supply.tokens < 100_000
    with pytest.raises(UserError) as exc:
        check_supply(config, small_data_dir, f"{method} (preset paper)")
    message = str(exc.value)
    assert f"2000 steps x 256 sequences + 16 held-out windows = 512,016 windows x 4096 tokens = " \
           f"{512_016 * 4096:,} unique tokens" in message
    assert f"holds at most {supply.tokens:,}" in message and "allow_stream_repeats" in message
    repeats = registry.create(method, {"preset": "paper", "allow_stream_repeats": True}).config
    check_supply(repeats, small_data_dir)  # allowed to repeat: the run records its passes instead


def test_a_hub_stream_is_judged_by_its_documented_size():
    check_supply(registry.create("leap", {"preset": "paper"}).config)  # SlimPajama-6B: about 6B tokens
    check_supply(registry.create("maskllm", {"preset": "paper"}).config)  # C4
    red = registry.create("maskllm", {"preset": "paper", "dataset": "redpajama"}).config
    with pytest.raises(UserError, match="holds about 1,000,000,000 .*2.1x what it can supply"):
        check_supply(red)
    assert HUB_TOKENS["slimpajama"][0] > 2000 * 256 * 4096
    fewer = registry.create("maskllm", {"preset": "paper", "dataset": "redpajama", "steps": 900}).config
    check_supply(fewer)  # 900 x 256 x 4096 = 0.94B tokens fit


def test_compressed_shards_are_not_judged_before_reading(tmp_path):
    import gzip

    with gzip.open(tmp_path / "shard.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "a b c"}) + "\n")
    assert stream_supply(str(tmp_path)).tokens is None
    check_supply(registry.create("leap", {"preset": "paper", "dataset": str(tmp_path)}).config)


def test_the_byte_bound_holds_for_what_the_stream_serves(small_data_dir, tiny_tokenizer):
    supply = stream_supply("slimpajama", small_data_dir)
    stream = WindowStream(open_documents("slimpajama", small_data_dir), tiny_tokenizer, 16)
    with pytest.raises(UserError):
        stream.take(0, 10 ** 6)  # read to the end of the pass
    assert stream.windows_per_pass * 16 <= supply.tokens


def test_a_real_run_refuses_the_stream_before_anything_is_written(small_data_dir, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: [tiny:llama]\nmethods: [{name: leap, config: {preset: paper}}]\nsparsities: ['0.5']\n"
                    "calibration: {dataset: lee, n_samples: 2, seqlen: 32}\neval: {perplexity: [lee], seqlen: 32}\n"
                    "seeds: [0]\ninclude_dense: false\n")
    results = tmp_path / "results"
    for extra in ([], ["--dry-run"]):
        code = main(["run", "--grid", str(grid), "--data-dir", str(small_data_dir), "--results", str(results), "-q",
                     *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "x what it can supply" in err[0], err
        assert not results.exists()
