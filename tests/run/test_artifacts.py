"""Saved masks -> exported HF checkpoint / re-evaluation give back the pruned model exactly."""
import json

import pytest
import torch

from prunebench.store.artifacts import MASKS_SUFFIX, load_masks
from prunebench.cli.command import main
from prunebench.run.grid import grid_from_dict
from prunebench.data.windows import eval_tokens
from prunebench.evaluate.perplexity import perplexity
from prunebench.modeling.models import tiny_tokenizer
from prunebench.run.runner import run_grid

SEQLEN, WINDOWS = 64, 16


@pytest.fixture(scope="module")
def pruned_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("artifacts") / "results"
    grid = grid_from_dict({
        "models": ["tiny:llama"], "methods": ["wanda", "sparsegpt"], "sparsities": ["0.5"],
        "calibration": {"dataset": "lee", "n_samples": 4, "seqlen": SEQLEN},
        "eval": {"perplexity": ["lee"], "seqlen": SEQLEN, "tasks": [], "max_ppl_windows": WINDOWS},
    })
    summary = run_grid(grid, results, progress=False, save_masks=True)
    assert summary.ok == 3
    return results, {r["method"]["name"]: r for r in summary.records}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_export_round_trip(pruned_results, tmp_path, method):
    from transformers import AutoModelForCausalLM

    results, records = pruned_results
    record = records[method]
    assert record["artifacts"]["masks"].endswith(MASKS_SUFFIX)
    # SparseGPT changes the kept weights, so its masks travel with the pruned weights
    assert ("weights" in record["artifacts"]) == (method == "sparsegpt")

    out = tmp_path / "export"
    assert main(["export", "--results", str(results), "--key", record["key"][:10], "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["key"] == record["key"]
    assert report["sparsity"]["achieved"] == pytest.approx(record["sparsity"]["achieved"])

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = eval_tokens(tiny_tokenizer(), "lee", None)
    ppl = perplexity(model, ids, SEQLEN, progress=False, max_windows=WINDOWS)["value"]
    assert ppl == pytest.approx(record["eval"]["perplexity"]["lee"]["value"], rel=1e-5)



def test_eval_with_masks_matches_record(pruned_results, capsys):
    results, records = pruned_results
    for method in ("wanda", "sparsegpt"):
        record = records[method]
        masks_file = results / "records" / record["artifacts"]["masks"]
        capsys.readouterr()
        assert main(["eval", "--masks", str(masks_file), "--ppl", "lee", "--seqlen", str(SEQLEN),
                     "--max-windows", str(WINDOWS), "--json", "-q"]) == 0
        out = capsys.readouterr().out
        value = json.loads(out[out.index("{"):])["perplexity"]["lee"]["value"]
        assert value == pytest.approx(record["eval"]["perplexity"]["lee"]["value"], rel=1e-5)


def test_eval_scores_the_recorded_windows_by_default(pruned_results, capsys, caplog, tmp_path):
    """Without --seqlen / --max-windows, eval reads the window length and count from the record
    beside the masks file and so gives back the recorded figure; a masks file alone falls back
    to 2048-token windows, or the model's position limit when shorter, and says so."""
    results, records = pruned_results
    record = records["wanda"]
    masks_file = results / "records" / record["artifacts"]["masks"]
    capsys.readouterr()
    assert main(["eval", "--masks", str(masks_file), "--ppl", "lee", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)["perplexity"]["lee"]
    assert (result["seqlen"], result["n_windows"]) == (SEQLEN, WINDOWS)
    assert result["value"] == pytest.approx(record["eval"]["perplexity"]["lee"]["value"], rel=1e-5)

    alone = tmp_path / masks_file.name
    alone.write_bytes(masks_file.read_bytes())
    with caplog.at_level("INFO", logger="prunebench"):
        assert main(["eval", "--masks", str(alone), "--ppl", "lee", "--max-windows", "1", "-q"]) == 0
    assert "windows of 512 tokens, at most 1 (from the model's position limit;" in caplog.text
    assert "(1 windows of 512)" in capsys.readouterr().out


def test_masks_are_bit_packed_with_shapes(pruned_results):
    results, records = pruned_results
    masks, meta, weights = load_masks(results / "records" / records["wanda"]["artifacts"]["masks"])
    assert weights is None and meta["model"] == "tiny:llama"
    shapes = json.loads(meta["shapes"])
    assert set(masks) == set(shapes) and len(masks) == 14  # 2 blocks x 7 linears
    mask = masks["model.layers.0.mlp.up_proj"]
    assert mask.dtype == torch.bool and list(mask.shape) == shapes["model.layers.0.mlp.up_proj"]
    assert abs(1 - mask.float().mean().item() - 0.5) < 0.01


def test_bad_artifact_input_is_one_line(pruned_results, tmp_path, capsys):
    results, records = pruned_results
    assert main(["eval", "--masks", str(tmp_path / "nope.masks.safetensors"), "-q"]) == 2
    assert main(["export", "--results", str(results), "--key", "ffffffffffff", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", "--results", str(results), "--out", str(tmp_path / "x")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("prunebench: error:") for e in errors)
