"""Measured speed (prunebench/measure/speed.py, `prunebench cost --speed`): the kernels compute the same
product, masks drawn from a record keep its counts and pattern, the patched model computes what
the masked model computes, and the command writes speed.csv that the cost table then shows."""
import pandas as pd
import pytest
import torch

from prunebench.measure import cost, speed
from prunebench.sparsity.checks import check_pattern
from prunebench.cli.command import main
from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix
from prunebench.sparsity.patterns import SparsitySpec


def test_every_kernel_gives_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 48, generator=gen) * (torch.rand(32, 48, generator=gen) > 0.6)
    x = torch.randn(5, 48, generator=gen)
    built = {name: speed.kernel(name, weight) for name in speed.KERNELS}
    assert built["dense"] is not None and built["torch-csr"] is not None
    for name, fn in built.items():
        if fn is not None:
            torch.testing.assert_close(fn(x), x @ weight.t(), rtol=1e-4, atol=1e-4, msg=name)
    assert speed.kernel("torch-bsr", torch.randn(30, 48)) is None  # 30 rows: not whole 16 x 16 blocks
    with pytest.raises(ValueError):
        speed.kernel("cusparselt", weight)


def test_random_masks_keep_the_records_counts_and_pattern():
    gen = torch.Generator().manual_seed(1)
    m = speed.random_mask(16, 32, 200, SparsitySpec.parse("0.6"), gen)
    assert int(m.sum()) == 200
    nm = speed.random_mask(16, 32, 256, SparsitySpec.parse("2:4"), gen)
    check_pattern([("nm", nm.float())], SparsitySpec.parse("2:4"))  # raises if not 2:4
    tiles = speed.random_mask(16, 32, 16 * 32 - 128, SparsitySpec.parse("hybrid:0.25/8"), gen)
    assert int(tiles.sum()) == 16 * 32 - 128
    check_pattern([("tiles", tiles.float())], SparsitySpec.parse("hybrid:0.25/8"))
    assert bool(speed.random_mask(4, 4, 16, None, gen).all())
    shapes = {"a": (8, 16), "b": (16, 16)}
    record = {"method": {"name": "wanda"}, "sparsity": {"label": "0.5", "pattern": "unstructured", "achieved": 0.5,
                                                        "per_layer": {"a": 0.25, "b": 0.75}}}
    masks = speed.masks_like(cost.record_linears(record, shapes))
    assert {n: int(v.sum()) for n, v in masks.items()} == {"a": 96, "b": 64}


def test_kernel_patched_model_computes_the_masked_model_and_restores():
    loaded = load_tiny("llama")
    model = loaded.model.eval()
    modules = all_prunable(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in modules.values():
            w = weight_matrix(m)
            w.mul_(torch.rand(w.shape, generator=gen) > 0.5)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=gen)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        chosen = {n: ("torch-csr", speed.kernel("torch-csr", weight_matrix(m))) for n, m in modules.items()}
        forwards = {n: m.forward for n, m in modules.items()}
        with speed.KernelLinears(modules, chosen):
            patched = model(input_ids=ids).logits
    torch.testing.assert_close(patched, reference, rtol=1e-4, atol=1e-4)
    assert all(m.forward == forwards[n] for n, m in modules.items())
    result = speed.measure(model, tokens=3, prompt_tokens=4, repeats=1)
    assert result["dense_tokens_per_s"] > 0 and result["best_tokens_per_s"] > 0
    assert sum(result["kernels"].values()) == len(modules)
    assert set(result["kernels"]) <= set(speed.KERNELS)


def test_cost_speed_command_writes_speed_and_the_table_shows_it(tmp_path, capsys, monkeypatch):
    results = tmp_path / "r"
    assert main(["run", "--models", "tiny:llama", "--methods", "magnitude,wanda", "--sparsities", "0.5,2:4",
                 "--results", str(results), "--n-samples", "2", "--seqlen", "32", "--tasks", "none",
                 "--max-ppl-windows", "2", "--seeds", "0", "-q"]) == 0
    capsys.readouterr()
    calls = []
    original = speed.measure

    def counted(model, **kw):
        calls.append(sum(int((weight_matrix(m) != 0).sum()) for m in all_prunable(model).values()))
        return original(model, tokens=2, prompt_tokens=4, repeats=1)

    monkeypatch.setattr(speed, "measure", counted)
    assert main(["cost", "--results", str(results), "--speed", "--threads", "1", "-q"]) == 0
    # magnitude and wanda keep the same counts per linear at each sparsity: one measurement each,
    # plus dense
    assert len(calls) == 3
    table = pd.read_csv(results / "report" / "speed.csv")
    assert len(table) == 5 and (table["best_tokens_per_s"] > 0).all()
    text = (results / "report" / "cost.md").read_text()
    assert "decode tok/s" in text and "Speed (measured" in text
    assert sorted(p.name for p in (results / "report").glob("quality_vs_latency__*.png"))
    # a later cost table (no --speed) keeps the measured columns
    assert main(["cost", "--results", str(results)]) == 0
    assert "decode tok/s" in (results / "report" / "cost.md").read_text()
    assert main(["cost", "--masks", "x.safetensors", "--speed"]) == 2
