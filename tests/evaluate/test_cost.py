"""The cost of a mask (prunebench/measure/cost.py, prunebench/report/cost.py, `prunebench cost`): storage
formats and FLOPs by hand-computed cases, and the command on a tiny run."""
import pandas as pd
import pytest
import torch

from prunebench.measure import cost
from prunebench.cli.command import main
from prunebench.report.cost import pareto_front
from prunebench.sparsity.n_of_m import nm_packed_bytes
from prunebench.sparsity.patterns import SparsitySpec

HALF = SparsitySpec.parse("0.5")
TWO_FOUR = SparsitySpec.parse("2:4")


def test_format_sizes_by_hand():
    # 8 x 16 = 128 weights, 64 kept, bf16
    assert cost.dense_bytes(128, 2) == 256
    assert cost.bitmask_bytes(128, 64, 2) == 64 * 2 + 16
    assert cost.csr_bytes(8, 64, 2) == 64 * 6 + 4 * 9
    assert nm_packed_bytes(64, 4, 2) == 64 * 2 + 64 * 2 // 8  # 1.125 bytes per weight at 2:4
    unstructured = cost.linear_cost("a", 8, 16, 64, HALF)
    assert unstructured.best == "bitmask" and set(unstructured.formats) == {"dense", "bitmask", "csr"}
    two_four = cost.linear_cost("a", 8, 16, 64, TWO_FOUR)
    assert two_four.best == "2:4 packed" and two_four.best_bytes == 144  # ties with bitmask: structured wins
    # CSR beats the bitmask only when 6 bytes per kept weight undercut 1 bit per weight (> ~98% sparse);
    # a nearly dense layer stays dense
    assert cost.linear_cost("a", 8, 16, 8, HALF).best == "bitmask"
    assert cost.linear_cost("a", 1, 1024, 4, HALF).best == "csr"
    assert cost.linear_cost("a", 8, 16, 127, HALF).best == "dense"
    # a record's per-layer sparsity of 0.25 puts half the weights in 2:4 tiles
    hybrid = cost.linear_cost("a", 8, 16, 96, SparsitySpec.parse("hybrid:0.25/8"), sparsity=0.25)
    assert hybrid.formats["dense|2:4 tiles"] == 64 * 2 + nm_packed_bytes(32, 4, 2) + 1
    assert hybrid.flops_per_token == 2 * 96


def test_model_cost_matches_the_estimates_for_the_embedded_shapes():
    # SmolLM2-135M: 30 blocks of q,o 576x576, k,v 192x576, gate,up 1536x576, down 576x1536; a tied
    # 49152 x 576 embedding (METHODS.md section 4: linears ~0.56x, model ~0.65x at 50%)
    block = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    shape = cost.ModelShape(hidden=576, vocab=49152, layers=30, other_params=49152 * 576 + 61 * 576, head_tied=True)
    linears = [cost.linear_cost(f"l{i}", r, c, r * c // 2, HALF) for i, (r, c) in enumerate(block * 30)]
    total = cost.model_cost(linears, shape)
    assert total["linear_ratio"] == pytest.approx(0.5625, abs=1e-3)
    assert total["model_ratio"] == pytest.approx(0.65, abs=0.01)
    assert total["flops_ratio"] == pytest.approx(0.65, abs=0.02)
    dense = cost.model_cost([cost.linear_cost(f"l{i}", r, c, r * c) for i, (r, c) in enumerate(block * 30)], shape)
    assert dense["model_ratio"] == 1.0 and dense["formats"] == {"dense": 210}


def test_record_linears_reads_pattern_and_per_layer_sparsity():
    shapes = {"a": (8, 16), "b": (16, 16)}
    record = {"method": {"name": "patch"}, "sparsity": {"label": "hybrid:0.25/8", "pattern": "dense|2:4 tiles",
                                                        "achieved": 0.25, "per_layer": {"a": 0.5, "b": 0.125}}}
    a, b = cost.record_linears(record, shapes)
    # every tile 2:4: the tile flags cost a byte more than the bitmask, and the smaller one is chosen
    assert a.pattern == "hybrid" and a.kept == 64 and a.formats["dense|2:4 tiles"] == 145 and a.best == "bitmask"
    assert b.formats["dense|2:4 tiles"] == 192 * 2 + nm_packed_bytes(32, 4, 2) + 1  # 64 of 256 in 2:4 tiles
    nm = cost.record_linears({"method": {"name": "wanda"}, "sparsity": {"label": "2:4", "pattern": "2:4",
                                                                      "per_layer": {"a": 0.5, "b": 0.5}}}, shapes)
    assert all(c.best == "2:4 packed" for c in nm)
    dense = cost.record_linears({"method": {"name": "dense"}, "sparsity": {"label": "0", "per_layer": {"a": 0.01}}}, shapes)
    assert all(c.best == "dense" and c.kept == c.numel for c in dense)


def test_pareto_front():
    frame = pd.DataFrame({"mb": [1.0, 2.0, 3.0, 2.5], "ppl": [50.0, 20.0, 10.0, 30.0]})
    assert pareto_front(frame, "mb", "ppl").tolist() == [True, True, True, False]


def test_cost_command_on_a_tiny_run_and_its_masks(tmp_path, capsys):
    results = tmp_path / "r"
    assert main(["run", "--models", "tiny:llama", "--methods", "wanda", "--sparsities", "0.5,2:4", "--results",
                 str(results), "--n-samples", "2", "--seqlen", "32", "--tasks", "none", "--max-ppl-windows", "4",
                 "--seeds", "0", "--save-masks", "-q"]) == 0
    capsys.readouterr()
    assert main(["cost", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "2:4 packed" in out and "bitmask" in out
    table = pd.read_csv(results / "report" / "cost.csv")
    assert set(table["sparsity_label"]) == {"dense", "0.5", "2:4"}
    assert (table.loc[table["sparsity_label"] != "dense", "model_ratio"] < 1).all()
    masks = sorted(results.glob("records/*.masks.safetensors"))
    assert masks
    assert main(["cost", "--masks", str(masks[0])]) == 0
    assert "GFLOP per token" in capsys.readouterr().out
    assert main(["cost", "--results", str(results), "--value-dtype", "int3"]) == 2
