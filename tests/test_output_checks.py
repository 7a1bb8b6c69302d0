"""Output checks cover every parameter (issue 29): whatever a method was not asked to change
(embeddings, norms, biases, the output head) must be the dense model's, and the weights it kept
must be what it says it did to them (unchanged unless it declares weight updates; then bounded,
and the change recorded).  The runner and `prunebench check --plugin` run the same checks; saved
masks are refused for a model other than the one they were made for."""
import json
import logging
import textwrap

import pytest
import torch

from prunebench.sparsity.checks import (
    DenseReference, OutputCheckError, check_against_dense, check_fixed_parameters, UPDATE_BOUND
)
from prunebench.cli.command import main
from prunebench.run.conformance import check_method
from prunebench.modeling.models import all_prunable, load_tiny
from prunebench.store.records import load_records

TINY = ["--seeds", "0", "--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "lee", "--tasks", "none",
        "--max-ppl-windows", "4", "-q"]

# Layer-wise magnitude pruning, then something done to the model behind the checks' back.
PLUGIN = '''
from dataclasses import dataclass
import torch
from prunebench.modeling.models import all_prunable
from prunebench.registry import Capabilities, LayerwisePruner, LinearResult, STATS_NONE, register
from prunebench.sparsity.patterns import mask_from_scores

MASK_ONLY = Capabilities(patterns=("unstructured", "nm"), needs_calibration=False, statistics=STATS_NONE)
UPDATES = Capabilities(patterns=("unstructured", "nm"), needs_calibration=False, statistics=STATS_NONE,
                       updates_weights=True)


class Base(LayerwisePruner):
    capabilities = MASK_ONLY
    default_scope = "layer"

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
        return LinearResult(mask=mask_from_scores(weight.abs(), spec))

    def prune(self, model, ctx):
        report = super().prune(model, ctx)
        with torch.no_grad():
            self.tamper(model)
        return report

    def tamper(self, model):
        pass


def kept_noise(model, size):
    gen = torch.Generator().manual_seed(0)
    for m in all_prunable(model).values():
        m.weight.add_((m.weight != 0) * size * torch.randn(m.weight.shape, generator=gen))


@register
class Embed7(Base):
    name = "oc_embed7"
    def tamper(self, model):
        model.get_input_embeddings().weight.mul_(7)


@register
class ZeroNorms(Base):
    name = "oc_zero_norms"
    def tamper(self, model):
        for m in model.modules():
            if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
                m.weight.zero_()


@register
class Noise(Base):
    name = "oc_noise"
    def tamper(self, model):
        kept_noise(model, 1e-3)


@register
class Bias(Base):
    name = "oc_bias"
    def tamper(self, model):
        next(p for n, p in model.named_parameters() if n.endswith("bias")).add_(0.01)


@register
class Head(Base):
    name = "oc_head"
    def tamper(self, model):
        model.get_output_embeddings().weight.mul_(1.5)


@register
class Repair(Base):  # says it updates the kept weights: a small change is its right
    name = "oc_repair"
    capabilities = UPDATES
    def tamper(self, model):
        kept_noise(model, 1e-3)


@register
class BlowUp(Base):  # says so too, but one weight runs away
    name = "oc_blowup"
    capabilities = UPDATES
    def tamper(self, model):
        w = next(iter(all_prunable(model).values())).weight
        w.view(-1)[w.reshape(-1).abs().argmax()] *= 1e4


@register
class LayerRepair(Base):  # returns new weights from prune_linear: the engine sees the update
    name = "oc_layer_repair"
    def prune_linear(self, weight, stats, spec, ctx):
        return LinearResult(mask=mask_from_scores(weight.abs(), spec), weight=weight * 1.01)


@register
class LayerRepairDenied(LayerRepair):  # ... but its capabilities say it never does
    name = "oc_layer_repair_denied"
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=False, statistics=STATS_NONE,
                                updates_weights=False)
'''

TAMPERED = [  # method, family, the first offending parameter the one-line reason names
    ("oc_embed7", "llama", "model.embed_tokens.weight differs from the dense model's"),
    ("oc_zero_norms", "llama", "model.layers.0.input_layernorm.weight differs"),
    ("oc_zero_norms", "gpt2", "transformer.h.0.ln_1.weight differs"),
    ("oc_noise", "llama", "model.layers.0.self_attn.q_proj.weight: "),
    ("oc_noise", "gpt2", "transformer.h.0.attn.c_attn.weight: "),
    ("oc_bias", "qwen2", "model.layers.0.self_attn.q_proj.bias differs"),
    ("oc_bias", "opt", "model.decoder.final_layer_norm.bias differs"),
    ("oc_head", "llama", "lm_head.weight differs"),
    ("oc_head", "gpt2", "transformer.wte.weight differs"),  # tied to the embeddings
    ("oc_blowup", "llama", f"more than {UPDATE_BOUND:g} times the layer's largest dense weight"),
    ("oc_layer_repair_denied", "llama", "kept weight(s) differ from the dense model's"),
]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    from prunebench import registry

    path = tmp_path_factory.mktemp("plugin") / "tamper.py"
    path.write_text(textwrap.dedent(PLUGIN))
    registry.load_plugin(path)
    return path


@pytest.mark.parametrize("method,family,needle", TAMPERED)
def test_tampering_fails_the_conformance_checks(plugin, calib_windows, method, family, needle):
    [outcome] = check_method(method, families=(family,), specs=("0.5",), calibration=calib_windows)
    assert not outcome.ok and needle in outcome.reason, outcome.line()
    assert "\n" not in outcome.line()


def test_noise_in_kept_weights_names_the_undeclared_update(plugin, calib_windows):
    [outcome] = check_method("oc_noise", families=("llama",), specs=("2:4",), calibration=calib_windows)
    assert not outcome.ok
    assert "kept weight(s) differ from the dense model's" in outcome.reason
    assert "Capabilities(updates_weights=True)" in outcome.reason


def test_declared_updates_pass_and_are_measured(plugin, calib_windows):
    for method in ("oc_repair", "oc_layer_repair"):
        outcomes = check_method(method, families=("llama", "gpt2"), specs=("0.5", "2:4"), calibration=calib_windows)
        assert len(outcomes) == 4 and all(o.ok for o in outcomes), [o.line() for o in outcomes]
        assert all("kept weights updated, relative change" in o.reason for o in outcomes)


def test_builtin_wanda_and_sparsegpt_pass(calib_windows):
    for method in ("wanda", "sparsegpt"):
        outcomes = check_method(method, families=("llama", "opt"), specs=("0.5", "2:4"), calibration=calib_windows)
        assert len(outcomes) == 4 and all(o.ok for o in outcomes), [o.line() for o in outcomes]
        # Wanda only zeroes weights; SparseGPT updates the ones it keeps, and the engine saw it
        assert all(("kept weights updated" in o.reason) == (method == "sparsegpt") for o in outcomes)


def test_the_check_command_fails_on_tampering_plugins(plugin, capsys):
    bad = "oc_embed7,oc_zero_norms,oc_noise,oc_bias,oc_head"
    assert main(["check", "--plugin", str(plugin), "--methods", bad, "--families", "qwen2"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL oc_") == 15 and "0 of 15 checks passed" in out  # 0.5, 0.6@layer, 2:4 each
    assert main(["check", "--plugin", str(plugin), "--methods", "oc_repair,oc_layer_repair", "--families", "qwen2"]) == 0
    assert "6 of 6 checks passed" in capsys.readouterr().out


def test_one_changed_bit_of_a_norm_is_found_and_nothing_else_is_copied():
    model = load_tiny("llama").model
    reference = DenseReference.take(model)
    # digests only for the fixed parameters; dense values only for the pruned linears
    assert all(isinstance(d, str) for d in reference.fixed.values()) and set(reference.prunable) == set(all_prunable(model))
    assert check_fixed_parameters(model, reference) == 7  # embeddings, 2 x 2 block norms, final norm, head
    norm = model.model.layers[1].post_attention_layernorm.weight
    dense = norm.detach().clone()
    with torch.no_grad():
        norm[3] = torch.nextafter(norm[3], torch.tensor(float("inf")))
    with pytest.raises(OutputCheckError, match=r"^model\.layers\.1\.post_attention_layernorm\.weight differs"):
        check_against_dense(model, reference, updates_weights=False)
    with torch.no_grad():
        norm.copy_(dense)
    found = check_against_dense(model, reference, updates_weights=False)
    assert found == {"unchanged_parameters": 7, "kept_weights": "unchanged", "weight_update": None}
    # an untied output head is a parameter the dense model did not have
    gpt2 = load_tiny("gpt2").model
    reference = DenseReference.take(gpt2)
    gpt2.lm_head.weight = torch.nn.Parameter(gpt2.lm_head.weight.detach().clone())
    with pytest.raises(OutputCheckError, match="lm_head.weight is a parameter the dense model does not have"):
        check_fixed_parameters(gpt2, reference)


def test_the_runner_records_what_it_checked(plugin, tmp_path):
    results = tmp_path / "results"
    # oc_embed7 runs before wanda on the same loaded model: its failure must not leak into wanda's cell
    code = main(["run", "--plugin", str(plugin), "--models", "tiny:llama", "--methods", "oc_embed7,wanda,sparsegpt",
                 "--sparsities", "0.5", "--results", str(results), *TINY])
    assert code == 1
    recs = {r["method"]["name"]: r for r in load_records(results)[0]}
    bad = recs["oc_embed7"]
    assert bad["status"] == "failed" and "\n" not in bad["error"]
    assert bad["error"].startswith("output check failed: model.embed_tokens.weight differs from the dense model's")
    dense, wanda, sgpt = recs["dense"], recs["wanda"], recs["sparsegpt"]
    assert dense["status"] == wanda["status"] == sgpt["status"] == "ok"
    assert dense["sparsity"]["checked"]["kept_weights"] == "dense"
    assert wanda["sparsity"]["checked"]["kept_weights"] == "unchanged"
    assert wanda["sparsity"]["checked"]["unchanged_parameters"] == 7 and "weight_update" not in wanda
    assert sgpt["sparsity"]["checked"]["kept_weights"] == "updated"
    update = sgpt["weight_update"]
    assert set(update["per_layer"]) == set(sgpt["sparsity"]["per_layer"])  # every linear, 14
    assert 0 < update["mean"] <= update["max"] < 1 and update["per_layer"][update["max_layer"]] == update["max"]


# ---------------------------------------------------------------------------------------------
# Saved masks carry the model's fingerprint

@pytest.fixture(scope="module")
def masks_file(tmp_path_factory):
    results = tmp_path_factory.mktemp("masks") / "results"
    assert main(["run", "--models", "tiny:llama", "--methods", "wanda", "--sparsities", "0.5", "--no-dense",
                 "--save-masks", "--results", str(results), *TINY]) == 0
    [record] = load_records(results)[0]
    return results / "records" / record["artifacts"]["masks"]


EVAL = ["--ppl", "lee", "--seqlen", "64", "--max-windows", "2", "-q"]


def test_masks_for_another_model_are_refused(masks_file, capsys):
    from safetensors import safe_open

    with safe_open(str(masks_file), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model_fingerprint"])["kind"] == "tiny" and meta["model_seed"] == "0"
    # tiny:mistral has the very same layer names and shapes as tiny:llama
    assert main(["eval", "--masks", str(masks_file), "--model", "tiny:mistral", *EVAL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "were made for tiny:llama" in err[0] and "not for tiny:mistral" in err[0]
    assert main(["eval", "--masks", str(masks_file), *EVAL]) == 0
    assert main(["eval", "--masks", str(masks_file), "--model", "tiny:llama", *EVAL]) == 0


def test_a_masks_file_without_a_fingerprint(masks_file, tmp_path, capsys, caplog):
    """An older prunebench's masks file: only with the model it names, and with a warning."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(masks_file), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("model_fingerprint", "model_seed")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / masks_file.name
    save_file(tensors, str(old), metadata=meta)
    assert main(["eval", "--masks", str(old), "--model", "tiny:mistral", *EVAL]) == 2
    assert "records no model fingerprint" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="prunebench"):
        assert main(["eval", "--masks", str(old), *EVAL]) == 0
    assert "not verified that tiny:llama is the model its masks were made for" in caplog.text
