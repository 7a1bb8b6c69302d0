"""The mask-learning engine (prunebench/engines/masklearn.py), for every learned method on it: the
learning-rate schedule and gate noise, resume to the uninterrupted mask, a NaN step named, only
the logits learning, and the loss a chunk of the vocabulary at a time.  The methods' own math:
methods/test_leap.py, methods/test_maskllm_and_patch.py, methods/test_proxsparse.py."""
import math

import pytest
import torch

from prunebench.engines import masklearn, masklearn_config, masklearn_gates, masklearn_loss
from prunebench import registry
from prunebench.errors import UserError
from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix
from prunebench.modeling.output_head import OutputHead
from prunebench.contract import PruneContext
from prunebench.sparsity.patterns import SparsitySpec

# (method, spec, config) for the engine tests: every learned method on the engine
LEARNED = [("leap", "0.5", {"preset": "tiny"}), ("maskllm", "2:4", {"preset": "tiny"}),
           ("patch", "hybrid:0.35/16", {"preset": "tiny"}), ("proxsparse", "2:4", {"preset": "tiny"})]


def _ctx(loaded, calib, target, **kw):
    return PruneContext(sparsity=SparsitySpec.parse(target), calibration=calib, seed=kw.pop("seed", 0), progress=False,
                        registry=registry, tokenizer=loaded.tokenizer, calibration_dataset="lee", **kw)


def _masks(model):
    return {n: (weight_matrix(m) != 0).clone() for n, m in all_prunable(model).items()}


# -- the engine -------------------------------------------------------------------------------------

def test_lr_schedule_decays_to_its_final_ratio():
    T = 100
    assert masklearn_config.lr_factor(0, T, 0, "cosine", 0.1) == pytest.approx(1.0)
    assert masklearn_config.lr_factor(T, T, 0, "cosine", 0.1) == pytest.approx(0.1)
    assert masklearn_config.lr_factor(T // 2, T, 0, "cosine", 0.1) == pytest.approx(0.55)
    assert masklearn_config.lr_factor(T, T, 5, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_gumbel_noise_is_gumbel():
    g = masklearn_gates.gumbel_noise((200_000,), torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
    assert g.mean().item() == pytest.approx(0.5772, abs=0.02)  # Euler-Mascheroni
    assert g.var().item() == pytest.approx(math.pi ** 2 / 6, rel=0.03)


@pytest.mark.parametrize("method,target,config", LEARNED)
def test_resume_gives_the_same_mask(calib_windows, tmp_path, monkeypatch, method, target, config):
    config = dict(config, steps=6, checkpoint_every=2)
    loaded = load_tiny("llama")
    registry.create(method, config).prune(loaded.model, _ctx(loaded, calib_windows, target, work_dir=tmp_path / "a"))
    uninterrupted = _masks(loaded.model)
    cls = registry.get(method)
    original = masklearn.LearnedMaskPruner._save_state

    def preempt(self, path, run_key, logits, optimizer, scheduler, step, curves):
        original(self, path, run_key, logits, optimizer, scheduler, step, curves)
        if step == 4:
            raise KeyboardInterrupt("preempted")

    monkeypatch.setattr(cls, "_save_state", preempt)
    loaded = load_tiny("llama")
    with pytest.raises(KeyboardInterrupt):
        registry.create(method, config).prune(loaded.model, _ctx(loaded, calib_windows, target, work_dir=tmp_path / "b"))
    state = tmp_path / "b" / f"{method}_state.safetensors"
    assert state.is_file()
    monkeypatch.setattr(cls, "_save_state", original)
    loaded = load_tiny("llama")
    report = registry.create(method, config).prune(loaded.model, _ctx(loaded, calib_windows, target,
                                                                       work_dir=tmp_path / "b"))
    assert report.stats["resumed_from_step"] == 4
    assert len(report.stats["curves"]["loss"]) == 6
    resumed = _masks(loaded.model)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert not state.exists()


@pytest.mark.parametrize("method,target,config", LEARNED)
def test_a_nan_step_fails_naming_the_step(calib_windows, method, target, config):
    loaded = load_tiny("llama")
    with torch.no_grad():
        next(iter(all_prunable(loaded.model).values())).weight[0, 0] = float("nan")
    # a prior that survives a NaN weight (SparseGPT's Hessian would stop first, with its own error)
    with pytest.raises(FloatingPointError, match="at step 0"):
        registry.create(method, dict(config, prior_method="magnitude")).prune(loaded.model,
                                                                             _ctx(loaded, calib_windows, target))


@pytest.mark.parametrize("method,target,config", LEARNED)
def test_only_logits_learn_and_the_result_keeps_dense_values(calib_windows, method, target, config):
    loaded = load_tiny("qwen2")
    dense = {n: weight_matrix(m).detach().clone() for n, m in all_prunable(loaded.model).items()}
    report = registry.create(method, config).prune(loaded.model, _ctx(loaded, calib_windows, target))
    assert all(p.requires_grad for p in loaded.model.parameters()), "requires_grad flags not restored"
    for name, m in all_prunable(loaded.model).items():
        w = weight_matrix(m)
        assert torch.equal(w[w != 0], dense[name][w != 0]), f"{name}: a kept weight changed"
    curves = report.stats["curves"]
    assert len(curves["loss"]) == config.get("steps", 6) and all(math.isfinite(v) for v in curves["loss"])
    assert curves["heldout_step"][0] == 0 and curves["heldout_step"][-1] == 6


# -- the chunked loss (large vocabularies) ----------------------------------------------------------

@pytest.mark.parametrize("family,softcap", [("llama", None), ("gemma3", None), ("gemma3", 3.0), ("opt", None)])
def test_chunked_loss_equals_the_full_loss(calib_windows, family, softcap):
    """The head and the cross-entropy a chunk at a time give the model's own loss and gradient
    (a softcap from the config is applied as the model's forward applies it)."""
    loaded = load_tiny(family)
    model = loaded.model
    if softcap:
        (getattr(model.config, "text_config", None) or model.config).final_logit_softcapping = softcap
    ids = calib_windows[:2, :40]
    head = OutputHead.of(model)
    assert head.softcap == softcap
    grads = []
    for chunk in (0, 7, 512):
        model.zero_grad(set_to_none=True)
        loss = masklearn_loss.model_lm_loss(model, ids, head if chunk else None, chunk)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    full_loss, full_grads = grads[0]
    for loss, g in grads[1:]:
        assert loss == pytest.approx(full_loss, rel=1e-6)
        assert g.keys() == full_grads.keys()
        for name in g:
            torch.testing.assert_close(g[name], full_grads[name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_trains_to_the_same_mask(calib_windows):
    loaded = load_tiny("llama")
    masks = []
    for chunk in (0, 9):
        registry.create("leap", {"preset": "tiny", "steps": 4, "loss_chunk": chunk}).prune(
            loaded.model, _ctx(loaded, calib_windows, "0.5"))
        masks.append(_masks(loaded.model))
        loaded = load_tiny("llama")
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


@pytest.mark.parametrize("value", [-1, 1.5, True, "512"])
def test_loss_chunk_is_validated(value):
    with pytest.raises(UserError, match="loss_chunk"):
        registry.create("leap", {"preset": "tiny", "loss_chunk": value})


def test_chunked_loss_refuses_a_head_it_cannot_reproduce():
    loaded = load_tiny("llama")
    loaded.model.config.logits_scaling = 4.0
    with pytest.raises(UserError, match="logits_scaling"):
        OutputHead.of(loaded.model)
