"""Output checks cover every parameter (issue 29): whatever a method was not asked to change
(embeddings, norms, biases, the output head) must be the dense model's, and the weights it kept
must be what it says it did to them (unchanged unless it declares weight updates; then bounded,
and the change recorded).  The runner and `prunebench check --plugin` run the same checks; an output
that breaks its cell (pattern, target, mask type, finiteness) is a failed record whose reason is
one line, and the grid goes on; saved masks are refused for a model other than the one they were
made for."""
import hashlib
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

from tiny_runs import TINY as TINY_FLAGS, by_method, layerwise_plugin, run

TINY = ["--seeds", "0", "--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "lee", "--tasks", "none",
        "--max-ppl-windows", "4", "-q"]

# Layer-wise magnitude pruning, then something done to the model behind the checks' back.
PLUGIN = '''
from dataclasses import dataclass
import torch
from prunebench.modeling.models import all_prunable
from prunebench import Capabilities, LayerwisePruner, LinearResult, STATS_NONE, register
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
    from prunebench.plugins import load_plugin

    path = tmp_path_factory.mktemp("plugin") / "tamper.py"
    path.write_text(textwrap.dedent(PLUGIN))
    load_plugin(path)
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
    assert wanda["sparsity"]["checked"]["mask"] == sgpt["sparsity"]["checked"]["mask"] == "reported"  # the engine's
    assert wanda["sparsity"]["checked"]["unchanged_parameters"] == 7 and "weight_update" not in wanda
    assert sgpt["sparsity"]["checked"]["kept_weights"] == "updated"
    update = sgpt["weight_update"]
    assert set(update["per_layer"]) == set(sgpt["sparsity"]["per_layer"])  # every linear, 14
    assert 0 < update["mean"] <= update["max"] < 1 and update["per_layer"][update["max_layer"]] == update["max"]
    # what the mask pruned is recorded beside the weights' zeros (equal here: a random model has none)
    assert wanda["sparsity"]["pruned_by_mask"] == pytest.approx(0.5, abs=1e-3)
    assert wanda["sparsity"]["pruned_by_mask"] == pytest.approx(wanda["sparsity"]["achieved"], abs=1e-6)
    assert "pruned_by_mask" not in dense["sparsity"]


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


# ---------------------------------------------------------------------------------------------
# The checks count the method's mask, not the weights' zeros (Gemma-3-270M's dequantised Q4_K_M
# linears hold 4.5% exact zeros: MaskLLM at 2:4 and PATCH at hybrid:0.35/64 failed on them)

from prunebench import registry  # noqa: E402
from prunebench.plugins import load_plugin  # noqa: E402
from prunebench.sparsity.checks import check_output, effective_scope
from prunebench.modeling.models import weight_matrix
from prunebench.contract import PruneContext, declares_weight_updates  # noqa: E402
from prunebench.sparsity.patterns import SparsitySpec

MASKS_PLUGIN = '''
from dataclasses import dataclass
import torch
from prunebench.modeling.models import all_prunable, weight_matrix
from prunebench import Capabilities, LayerwisePruner, LinearResult, Pruner, PruneReport, STATS_NONE, register
from prunebench.sparsity.patterns import mask_from_scores

CAPS = Capabilities(patterns=("unstructured", "nm"), needs_calibration=False, statistics=STATS_NONE)


@dataclass
class NoConfig:
    pass


@register
class ZeroExtra(LayerwisePruner):  # magnitude, then a few kept weights zeroed behind the mask's back
    name = "oc_zero_extra"
    capabilities = CAPS
    default_scope = "layer"
    Config = NoConfig

    def prune_linear(self, weight, stats, spec, ctx):
        return LinearResult(mask=mask_from_scores(weight.abs(), spec))

    def prune(self, model, ctx):
        report = super().prune(model, ctx)
        w = weight_matrix(next(iter(all_prunable(model).values())))
        with torch.no_grad():
            first = (w[0] != 0).nonzero().flatten()[:3]
            w[0, first] = 0  # 3 of a 64 x 64 layer's weights: 0.07 points, inside the tolerance
        return report


class OwnMasks(Pruner):  # implements prune itself and reports its masks, as a plugin may
    capabilities = CAPS
    Config = NoConfig

    def prune(self, model, ctx):
        spec = ctx.sparsity.resolved("layer")
        masks = {}
        for name, module in all_prunable(model).items():
            w = weight_matrix(module)
            dense = w.detach().clone()
            mask = mask_from_scores(dense.abs().float(), spec)
            with torch.no_grad():
                w.mul_(mask.to(w.dtype))
            masks[name] = self.reported(mask, dense)
        return PruneReport(stats={"scope": "layer"}, masks=masks)

    def reported(self, mask, dense):
        return mask


@register
class Own(OwnMasks):
    name = "oc_own_masks"


@register
class Short(OwnMasks):  # says it kept 5% of the weights that are zero: its mask prunes 45% where 50% is asked
    name = "oc_short_mask"
    def reported(self, mask, dense):
        zero = (dense == 0).flatten().nonzero().flatten()
        mask = mask.clone()
        mask.view(-1)[zero[:int(0.05 * dense.numel())]] = True
        return mask


@register
class Leaky(OwnMasks):  # reports a mask that prunes more than it zeroed
    name = "oc_leaky_mask"
    def reported(self, mask, dense):
        mask = mask.clone()
        mask[0, mask[0].nonzero().flatten()[0]] = False
        return mask


@register
class WrongShape(OwnMasks):
    name = "oc_wrong_shape_mask"
    def reported(self, mask, dense):
        return mask.t()[:3]
'''


@pytest.fixture(scope="module")
def masks_plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "masks.py"
    path.write_text(textwrap.dedent(MASKS_PLUGIN))
    load_plugin(path)
    return path


def zero_heavy_tiny(family="llama", *, seed=0):
    """A tiny model whose linears hold many exact zeros, as a quantised checkpoint's do: in 30% of
    the groups of 4 inputs three weights are zero (a 2:4 mask must keep one of them), and 10% of
    the other weights are zero (every 16 x 16 tile has more than the 5% a dense tile may show)."""
    loaded = load_tiny(family, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in all_prunable(loaded.model).values():
            w = weight_matrix(module)
            groups = w.view(w.shape[0], -1, 4)
            heavy = torch.rand(groups.shape[:2], generator=gen) < 0.3
            groups[..., :3].masked_fill_(heavy.unsqueeze(-1), 0.0)
            w.masked_fill_(torch.rand(w.shape, generator=gen) < 0.1, 0.0)
    return loaded


def prune_and_check(method, spec_text, calibration, *, loaded=None, config=None, use_masks=True):
    """Prune (a zero-heavy tiny model by default) and run the runner's checks on the result."""
    loaded = loaded or zero_heavy_tiny()
    spec = SparsitySpec.parse(spec_text)
    pruner = registry.create(method, registry.get(method).test_config if config is None else config)
    reference = DenseReference.take(loaded.model)
    ctx = PruneContext(sparsity=spec, calibration=calibration, progress=False, registry=registry,
                       tokenizer=loaded.tokenizer, calibration_dataset="lee")
    torch.manual_seed(0)
    report = pruner.prune(loaded.model, ctx)
    named = [(n, weight_matrix(m)) for n, m in all_prunable(loaded.model).items()]
    return check_output(named, spec, effective_scope(spec, report.stats.get("scope")), layer_specs=report.layer_specs,
                        model=loaded.model, reference=reference,
                        updates_weights=declares_weight_updates(pruner.capabilities, report),
                        masks=report.masks if use_masks else None)


def test_the_zero_heavy_model_is_what_failed_before():
    """Counting the weights' zeros, a correct 2:4 or hybrid mask fails on this model: the checks
    must count the method's mask instead (the tests below)."""
    loaded = zero_heavy_tiny()
    named = [(n, weight_matrix(m)) for n, m in all_prunable(loaded.model).items()]
    zeros = sum(int((w == 0).sum()) for _, w in named) / sum(w.numel() for _, w in named)
    assert 0.25 < zeros < 0.35
    with pytest.raises(OutputCheckError, match="tiles of 16 x 16 are neither dense nor 2:4"):
        check_output(named, SparsitySpec.parse("hybrid:0.35/16"), "global")  # every tile dense, by its mask


@pytest.mark.parametrize("method,spec", [("magnitude", "2:4"), ("sparsegpt", "2:4"), ("wanda", "0.5"),
                                         ("maskllm", "2:4"), ("patch", "hybrid:0.35/16")])
def test_a_model_with_many_exact_zeros_passes_when_its_masks_are_counted(calib_windows, method, spec):
    found = prune_and_check(method, spec, calib_windows)
    assert found["mask"] == "reported"
    if method in ("maskllm", "patch"):  # learned masks keep some of the dense zeros: the old check failed
        with pytest.raises(OutputCheckError, match="more than 0.005 from the|neither dense nor 2:4"):
            prune_and_check(method, spec, calib_windows, use_masks=False)


def test_a_plugin_reporting_its_own_masks_gets_the_same_checks(masks_plugin, calib_windows):
    assert prune_and_check("oc_own_masks", "2:4", calib_windows)["mask"] == "reported"
    assert prune_and_check("oc_own_masks", "0.5", calib_windows)["mask"] == "reported"
    with pytest.raises(OutputCheckError, match=r"^model\.layers\.0\.self_attn\.q_proj: 1 weight\(s\) its mask "
                                               r"prunes are not zero$"):
        prune_and_check("oc_leaky_mask", "2:4", calib_windows)
    with pytest.raises(OutputCheckError, match=r"mask must be a bool tensor of the weight's shape \(64, 64\), "
                                               r"got torch.bool \(3, 64\)$"):
        prune_and_check("oc_wrong_shape_mask", "2:4", calib_windows)


def test_a_mask_short_of_the_target_fails_though_the_dense_zeros_fill_the_weights(masks_plugin, calib_windows):
    # 45% pruned by the mask, and the dense model's zeros it keeps make the weights look 50% sparse
    assert prune_and_check("oc_short_mask", "0.5", calib_windows, use_masks=False)["mask"] == "zeros"
    loaded = zero_heavy_tiny()
    with pytest.raises(OutputCheckError, match=r"^model\.layers\.0\.self_attn\.q_proj: sparsity 0\.45\d+ is "
                                               r"more than 0\.005 from the per-layer target 0\.5000$"):
        prune_and_check("oc_short_mask", "0.5", calib_windows, loaded=loaded)


def test_zeroing_weights_the_mask_keeps_fails_even_inside_the_tolerance(masks_plugin, calib_windows):
    assert prune_and_check("oc_zero_extra", "0.5", calib_windows, loaded=load_tiny("llama"), use_masks=False)
    with pytest.raises(OutputCheckError, match=r"^model\.layers\.0\.self_attn\.q_proj: 3 weight\(s\) its mask "
                                               r"keeps are zero but were not in the dense model: the method zeroed "
                                               r"more than its mask says$"):
        prune_and_check("oc_zero_extra", "0.5", calib_windows, loaded=load_tiny("llama"))
    # the same check through the runner
    [outcome] = check_method("oc_zero_extra", families=("llama",), specs=("2:4",), calibration=calib_windows)
    assert not outcome.ok and "the method zeroed more than its mask says" in outcome.reason


# ---------------------------------------------------------------------------------------------
# A method's output that breaks its cell (pattern, target, type, finiteness) is a failed record, in one line

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
               sparsity, "--results", str(results), *TINY_FLAGS)
    assert code == 1
    recs = by_method(results)
    bad = recs[(name, sparsity)]
    assert bad["status"] == "failed" and needle in bad["error"], bad["error"]
    assert "\n" not in bad["error"]
    assert recs[("magnitude", sparsity)]["status"] == "ok"  # the grid went on
    ok = recs[("magnitude", sparsity)]
    assert ok["sparsity"]["checked"]["finite"] and len(ok["sparsity"]["mask_sha256"]) == 64
