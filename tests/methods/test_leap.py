"""LEAP (methods/leap.py): the math as pure functions, and the training loop on tiny models (its
weights untouched while it learns, gradients through checkpointing, a lower loss than its Wanda
prior, the masks of the loop that predates the engine).  What every learned method shares (resume,
a NaN step named): engines/test_masklearn.py."""
import importlib
import math

import pytest
import torch

from prunebench import registry
from prunebench.modeling.models import all_prunable, load_tiny
from prunebench.contract import PruneContext
from prunebench.sparsity.patterns import SparsitySpec

leap = importlib.import_module("prunebench.methods.leap")
from prunebench.engines import masklearn_config, masklearn_gates, masklearn_loss


def _ctx(loaded, calib, target="0.5", **kw):
    return PruneContext(sparsity=SparsitySpec.parse(target), calibration=calib, seed=kw.pop("seed", 0), progress=False,
                        registry=registry, tokenizer=loaded.tokenizer, calibration_dataset="lee", **kw)


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in all_prunable(model).items()}


# -- pure functions ------------------------------------------------------------------------------

def test_schedules_start_middle_end():
    c = leap.Leap.Config(preset="paper")
    pruner = leap.Leap(c)
    T = c.steps
    start, middle, end = pruner.schedule(0), pruner.schedule(T // 2), pruner.schedule(T)
    assert (start["tau"], start["alpha"], start["lambda_weight"]) == (4.0, 25.0, 10.0)
    assert middle["tau"] == pytest.approx((4.0 + 0.05) / 2)
    assert middle["alpha"] == pytest.approx((25 + 350) / 2)
    assert middle["lambda_weight"] == pytest.approx(5.0)
    assert end["tau"] == pytest.approx(0.05) and end["alpha"] == pytest.approx(350.0)
    assert end["lambda_weight"] == pytest.approx(0.0)
    # lr: linear warm-up over 5 steps, then cosine from the peak to 0
    assert masklearn_config.lr_factor(0, T, 5) == pytest.approx(1 / 5)
    assert masklearn_config.lr_factor(4, T, 5) == pytest.approx(1.0)
    assert masklearn_config.lr_factor(5, T, 5) == pytest.approx(1.0)
    assert masklearn_config.lr_factor(5 + (T - 5) // 2, T, 5) == pytest.approx(0.5, abs=1e-3)
    assert masklearn_config.lr_factor(T, T, 5) == pytest.approx(0.0, abs=1e-9)


def test_config_presets_fill_and_override():
    c = leap.Leap.Config(preset="paper", lr=1e-2)
    assert (c.steps, c.batch_size, c.seqlen, c.lr, c.final_mask) == (2000, 256, 4096, 1e-2, "sign")
    import dataclasses
    # every hyperparameter actually used is listed (the training dataset is resolved per cell)
    assert all(v is not None for k, v in dataclasses.asdict(c).items() if k != "dataset")
    with pytest.raises(Exception):
        registry.create("leap", {"preset": "tiny", "no_such_option": 1})


def test_masked_weight_matches_reference_and_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 5, generator=gen) * 0.05).requires_grad_(True)
    weight = torch.randn(7, 5, generator=gen)
    alpha, tau, seed = 30.0, 0.7, 1234
    masked, msum, msq = leap.masked_weight(logits, weight, seed, alpha, tau)
    noise = masklearn_gates.logistic_noise((7, 5), torch.Generator().manual_seed(seed))
    ref_logits = logits.detach().clone().requires_grad_(True)
    m = leap.soft_mask(ref_logits, noise, alpha, tau)
    ref = m * weight
    torch.testing.assert_close(masked, ref)
    g = torch.randn(7, 5, generator=gen)
    (masked * g).sum().add(3 * msum).add(0.5 * msq).backward()
    (ref * g).sum().add(3 * m.sum()).add(0.5 * ref.square().sum()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-4)


def test_noise_is_fresh_per_forward_and_reproducible():
    a = masklearn_gates.noise_seed("leap", 0, 3, 0, 5)
    assert a == masklearn_gates.noise_seed("leap", 0, 3, 0, 5)
    assert len({a, masklearn_gates.noise_seed("leap", 0, 4, 0, 5), masklearn_gates.noise_seed("leap", 0, 3, 1, 5), masklearn_gates.noise_seed("leap", 0, 3, 0, 6),
                masklearn_gates.noise_seed("leap", 1, 3, 0, 5)}) == 5
    n = masklearn_gates.logistic_noise((200_000,), torch.Generator().manual_seed(a))
    assert torch.isfinite(n).all()
    assert n.mean().item() == pytest.approx(0.0, abs=0.02)
    assert n.var().item() == pytest.approx(math.pi ** 2 / 3, rel=0.03)  # Logistic(0, 1) variance


def test_regularisers_and_prior_and_final_masks():
    assert leap.density_penalty(torch.tensor(30.0), 100, 0.4).item() == pytest.approx(0.1)
    ratio = leap.weight_ratio([torch.tensor(1.0), torch.tensor(2.0)], 6.0)
    assert ratio.item() == pytest.approx(0.5)
    keep = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) > 0.6
    p = leap.prior_logits(keep, 0.014, 3.0, torch.Generator().manual_seed(2))
    # a 3-sigma shift: the sign rule reproduces the prior except for the rare |N(0,1)| > 3 draws
    assert (leap.sign_mask(p) == keep).float().mean().item() > 0.995
    assert p[keep].mean().item() == pytest.approx(3 * 0.014, rel=0.1)
    logits = {"a": torch.randn(10, 10), "b": torch.randn(5, 20)}
    masks = leap.final_masks(logits, "topk", SparsitySpec.parse("0.6"))
    assert sum(int(m.sum()) for m in masks.values()) == 80
    flat = torch.cat([logits["a"].flatten(), logits["b"].flatten()])
    kept = torch.cat([masks["a"].flatten(), masks["b"].flatten()])
    assert flat[kept].min() >= flat[~kept].max()
    per_layer = leap.final_masks(logits, "topk", SparsitySpec.parse("0.6@layer"))
    assert all(int(m.sum()) == 40 for m in per_layer.values())


def test_density_regulariser_pulls_density_to_target():
    gen = torch.Generator().manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(64, 64, generator=gen) * 0.014)
    weight = torch.randn(64, 64, generator=gen)
    opt = torch.optim.AdamW([logits], lr=5e-2, betas=(0.9, 0.95), weight_decay=0.0)
    target = 0.2
    for step in range(60):
        opt.zero_grad()
        _, msum, _ = leap.masked_weight(logits, weight, masklearn_gates.noise_seed("leap", 0, step, 0, 0), 25.0, 1.0)
        leap.density_penalty(msum, logits.numel(), target).backward()
        opt.step()
    assert (leap.sign_mask(logits.detach()).float().mean().item()) == pytest.approx(target, abs=0.05)


# -- the training loop on tiny models --------------------------------------------------------------

def test_only_logits_learn_and_weights_stay_identical(calib_windows, monkeypatch):
    loaded = load_tiny("llama")
    dense = _weights(loaded.model)
    seen = {}
    original = leap.final_masks

    def spy(logits, rule, spec):
        seen["weights"] = _weights(loaded.model)
        seen["grads"] = [p.grad for p in loaded.model.parameters()]
        seen["logit_grads"] = [p.grad is not None for p in logits.values()]
        return original(logits, rule, spec)

    monkeypatch.setattr(leap, "final_masks", spy)
    report = registry.create("leap", {"preset": "tiny", "steps": 3}).prune(loaded.model, _ctx(loaded, calib_windows))
    for name, w in dense.items():
        assert torch.equal(seen["weights"][name], w), f"{name} changed during training"
    assert all(g is None for g in seen["grads"]), "a model weight received a gradient"
    assert all(p.requires_grad for p in loaded.model.parameters()), "requires_grad flags not restored"
    # the hard mask is applied at the end: zeros only where the mask prunes
    assert report.stats["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    for name, w in _weights(loaded.model).items():
        assert torch.equal(w[w != 0], dense[name][w != 0])


def test_logit_gradients_only(calib_windows):
    loaded = load_tiny("qwen2")
    modules = all_prunable(loaded.model)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    params = {n: torch.nn.Parameter(torch.zeros_like(m.weight)) for n, m in modules.items()}
    patch = masklearn_gates.MaskedLinears(modules, {n: {"P": p} for n, p in params.items()}, registry.create("leap"))
    patch.mode, patch.sched = "soft", {"alpha": 25.0, "tau": 4.0}
    ids = calib_windows[:2, :32]
    masklearn_loss.lm_loss(loaded.model(input_ids=ids, use_cache=False).logits, ids).backward()
    patch.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for p in loaded.model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(calib_windows, monkeypatch):
    grads, calls = [], []
    original = leap.masked_weight
    monkeypatch.setattr(leap, "masked_weight", lambda *a: calls.append(1) or original(*a))
    for checkpointing in (False, True):
        calls.clear()
        loaded = load_tiny("llama")
        model = loaded.model
        modules = all_prunable(model)
        for p in model.parameters():
            p.requires_grad_(False)
        params = {n: torch.nn.Parameter(torch.full_like(m.weight, 0.01)) for n, m in modules.items()}
        patch = masklearn_gates.MaskedLinears(modules, {n: {"P": p} for n, p in params.items()}, registry.create("leap"))
        patch.mode, patch.sched = "soft", {"alpha": 25.0, "tau": 1.0}
        if checkpointing:
            assert masklearn_loss.enable_checkpointing(model)
            model.train()
        ids = calib_windows[:2, :32]
        ce = masklearn_loss.lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        msum = torch.stack([patch.stats[n]["mask_sum"] for n in modules]).sum()
        (ce + 7 * leap.density_penalty(msum, sum(p.numel() for p in params.values()), 0.5)).backward()
        patch.remove()
        grads.append({n: p.grad.clone() for n, p in params.items()})
        # with checkpointing the masks are sampled again (the same draw) in the recomputation
        assert len(calls) == len(modules) * (2 if checkpointing else 1)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_leap_lowers_training_loss_below_its_wanda_prior(calib_windows):
    config = {"preset": "tiny", "steps": 25, "batch_size": 4, "seqlen": 32, "lr": 3e-2, "final_mask": "topk",
              "heldout_every": 0}
    loaded = load_tiny("llama")
    pruner = registry.create("leap", config)
    ctx = _ctx(loaded, calib_windows, "0.6")
    _, train, _, _ = pruner.training_windows(ctx)
    seen = torch.cat([pruner.batch(train, s, ctx.seed) for s in range(config["steps"])])

    def loss(model):
        with torch.no_grad():
            return masklearn_loss.lm_loss(model(input_ids=seen, use_cache=False).logits, seen).item()

    prior = load_tiny("llama")
    registry.create("wanda").prune(prior.model, ctx)
    report = pruner.prune(loaded.model, ctx)
    assert report.stats["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert loss(loaded.model) < loss(prior.model) - 0.01


# -- LEAP on the shared mask-learning engine is the LEAP it was before ------------------------------

# Masks (sha256 of every layer's keep-mask, in layer order) and per-step training losses of the
# implementation that predates prunebench.engines.masklearn (commit 7be45e8, LEAP's own loop), seed 3,
# with the gate noise it drew (torch's generator; the presets now use the fused counter sampler).
PRE_ENGINE_LEAP = [
    ("llama", "0.5", {'preset': 'tiny', 'sampler': 'generator'},
     "1194045720be61683615fe065d496a44eb12a3a74d4e46ed446351fd52be2396",
     [-3.484456, -2.315073, -0.822082, 0.790511, 2.364296, 3.956992]),
    ("qwen2", "0.6", {'preset': 'tiny', 'final_mask': 'topk', 'steps': 8, 'grad_accum': 2, 'sampler': 'generator'},
     "ed8780f74637442e577cd11dca757e1c9ef531da41e29ae0520cf7c0e2b4c9da",
     [-2.988434, -2.280262, -1.285797, -0.174706, 0.922147, 2.058837, 3.229153, 4.360643]),
]


@pytest.mark.parametrize("family,target,config,mask_sha256,losses", PRE_ENGINE_LEAP)
def test_leap_on_the_engine_gives_the_pre_engine_masks(calib_windows, family, target, config, mask_sha256, losses):
    import hashlib

    loaded = load_tiny(family)
    report = registry.create("leap", config).prune(loaded.model, _ctx(loaded, calib_windows, target, seed=3))
    digest = hashlib.sha256()
    for name, m in all_prunable(loaded.model).items():
        digest.update(name.encode())
        digest.update((m.weight != 0).numpy().tobytes())
    assert report.stats["curves"]["loss"] == pytest.approx(losses, abs=1e-5)
    assert digest.hexdigest() == mask_sha256
