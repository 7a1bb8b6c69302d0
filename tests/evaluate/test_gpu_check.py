"""benchmarks/gpu_check.py on a machine without CUDA: it skips cleanly, and the parts that do not
need a GPU run on a tiny model (issue 35)."""
import json
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

sys.path.pop(0)

from prunebench.run import plan
from prunebench.modeling.models import all_prunable, weight_matrix

SMALL = dict(leap=dict(batch=1, seqlen=16, repeats=1), prune=dict(n=2, seqlen=16, methods=("magnitude", "wanda")),
             decode_kw=dict(tokens=2, prompt_tokens=4, repeats=1))


def test_without_cuda_it_writes_a_skip_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"] == "no CUDA"
    assert "skipped: no CUDA" in capsys.readouterr().out


def test_two_four_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.125, -0.25, 0.375]])
    assert gpu_check.two_four(w).tolist() == [[0.0, -4.0, 3.0, 0.0, 0.5, 0.0, 0.0, 0.375]]
    r = gpu_check.two_four(torch.randn(8, 64))
    assert ((r.reshape(8, 16, 4) != 0).sum(-1) == 2).all()


def test_the_embedded_shapes_build_a_random_stand_in_of_the_same_shape():
    for spec, arch in plan.EMBEDDED_ARCHS.items():
        again = plan.arch_from_config(arch.name, gpu_check.random_config(arch))
        assert again == arch, spec


def test_on_a_cpu_every_section_but_the_sparse_kernels_runs_on_a_tiny_model():
    result = gpu_check.run_check(["tiny:llama"], "cpu", **SMALL)
    entry = result["models"]["tiny:llama"]
    assert entry["layer_shapes"] == [[32, 64], [64, 64], [64, 128], [128, 64]]
    step = entry["leap_step"]
    assert step["dense_s"] > 0 and step["leap_s"] > 0 and step["ratio"] == step["leap_s"] / step["dense_s"]
    assert step["leap_peak_bytes"] is None and step["dtype"] == "bfloat16"  # no GPU memory to measure
    prune = entry["prune"]
    assert prune["dense_forward_s"] > 0 and prune["calibration"] == [2, 16]
    for method in ("magnitude", "wanda"):
        assert prune[method]["sparsity"] == pytest.approx(0.5, abs=0.01) and prune[method]["ratio"] > 0
    assert entry["decode"]["dense_tokens_per_s"] > 0 and "need CUDA" in entry["decode"]["sparse"]
    assert result["semi_structured"] == [{"skipped": "semi-structured sparse tensors need CUDA"}]
    json.dumps(result)  # what main writes


def test_pruning_and_decoding_put_the_dense_weights_back():
    model, _ = gpu_check.load("tiny:llama", "cpu")
    before = {n: weight_matrix(m).clone() for n, m in all_prunable(model).items()}
    gpu_check.prune_times(model, "cpu", methods=("magnitude",), n=2, seqlen=16)
    gpu_check.decode(model, "cpu", tokens=2, prompt_tokens=4, repeats=1)
    assert all(torch.equal(before[n], weight_matrix(m)) for n, m in all_prunable(model).items())


def test_a_spent_budget_skips_the_remaining_sections():
    result = gpu_check.run_check(["tiny:llama"], "cpu", budget_s=0)
    entry = result["models"]["tiny:llama"]
    assert all("time budget" in entry[k]["skipped"] for k in ("leap_step", "prune", "decode"))
    assert "time budget" in result["semi_structured"]["skipped"]
