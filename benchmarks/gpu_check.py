"""One prepared GPU check (issue 35): what the plan's estimates rest on, measured on a CUDA machine.

In one run (under 5 minutes on one GPU), each figure against its dense counterpart of the same run:

  leap_step       a LEAP training step (time, peak memory) vs a dense forward+backward of the same
                  tokens that trains the prunable weights (benchmarks/learned_step.py's reference),
                  bf16 weights and logits, on each embedded model
  prune           one-shot prune times (magnitude, Wanda, SparseGPT, ADMM at 50%) vs one dense
                  forward pass over the same calibration tokens
  semi_structured a 2:4 weight through torch's semi-structured sparse tensors vs the dense weight,
                  on every layer shape of the embedded models, batch 1 and 128, bf16
  decode          greedy decoding tokens/s with every linear 2:4 and semi-structured vs the same
                  2:4 weights on dense kernels

Writes one JSON file.  Without CUDA it writes {"skipped": "no CUDA", ...} and exits 0.  Where an
embedded model's package is not installed, a model of its shape with random weights stands in
(timings and memory depend on the shapes, not the values) and the JSON says so.

    python benchmarks/gpu_check.py                       # writes gpu_check.json
    python benchmarks/gpu_check.py --out results/benchmarks/gpu_check.json --budget 240
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the sibling CPU benchmark's dense floor

from prunebench.engines import masklearn_gates, masklearn_loss, masklearn_optim
from prunebench import registry
from prunebench.modeling.models import all_prunable, restore_prunable, snapshot_prunable, weight_matrix
from prunebench.run.plan import EMBEDDED_ARCHS
from learned_step import dense_step_for  # noqa: E402
from prunebench.contract import PruneContext, PruneReport  # noqa: E402
from prunebench.sparsity.patterns import SparsitySpec

ONESHOT = ("magnitude", "wanda", "sparsegpt", "admm")
BATCHES = (1, 128)
DEFAULT_BUDGET_S = 270  # sections not started by then are skipped, so the whole run stays under 5 minutes


# ---------------------------------------------------------------------------------------------
# Timing and memory

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn(), the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn, device) -> int | None:
    """Peak allocated GPU memory while fn() runs (None off CUDA)."""
    if torch.device(device).type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


# ---------------------------------------------------------------------------------------------
# Models

def random_config(arch):
    """A transformers config of an embedded model's shape (Gemma-3 for a 256-wide head, else Llama)."""
    import transformers as T

    common = dict(hidden_size=arch.hidden, intermediate_size=arch.intermediate, num_hidden_layers=arch.layers,
                  num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim,
                  vocab_size=arch.vocab, tie_word_embeddings=arch.tied, max_position_embeddings=4096)
    if "gemma" in arch.name.lower():
        return T.Gemma3TextConfig(**common)
    return T.LlamaConfig(**common)


def load(spec: str, device, dtype=torch.bfloat16):
    """(model on device, where its weights came from)."""
    from transformers import AutoModelForCausalLM

    from prunebench.errors import UserError
    from prunebench.modeling.models import load_model

    if spec.startswith("tiny:") or spec not in EMBEDDED_ARCHS:
        loaded = load_model(spec, dtype=str(dtype).replace("torch.", ""))
        return loaded.model.to(device).eval(), spec
    try:
        model, source = load_model(spec, dtype=str(dtype).replace("torch.", "")).model, "embedded weights"
    except (UserError, ImportError, OSError) as exc:  # the model's package is not installed here
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(random_config(EMBEDDED_ARCHS[spec]), dtype=dtype)
        source = f"random weights of its shape ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return model.to(device).eval(), source


def layer_shapes(model) -> list:
    """The distinct (out, in) shapes of the prunable linears."""
    return sorted({tuple(weight_matrix(m).shape) for m in all_prunable(model).values()})


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """weight with the 2 smallest magnitudes of every 4 consecutive inputs zeroed (2:4 along a row)."""
    out, inp = weight.shape
    groups = weight.reshape(out, inp // 4, 4)
    keep = groups.abs().float().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out, inp)


# ---------------------------------------------------------------------------------------------
# Sections

def leap_step(model, device, *, batch: int = 4, seqlen: int = 512, repeats: int = 5) -> dict:
    """A LEAP step (mask sampling, forward, regularisers, backward) vs a dense forward+backward of
    the same tokens that trains the prunable weights; bf16 logits as the paper preset keeps them."""
    modules = all_prunable(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    for p in model.parameters():
        p.requires_grad_(False)

    dense_step = dense_step_for(model, modules, ids)

    spec = SparsitySpec.parse("0.5")
    pruner = registry.create("leap", {"preset": "embedded", "prior_method": "magnitude", "logits_dtype": "bfloat16"})
    ctx = PruneContext(sparsity=spec, progress=False, registry=registry, device=str(device))
    initial = pruner.init_logits(model, modules, ctx, PruneReport())
    frozen = pruner.frozen_keys()
    dtype = next(iter(modules.values())).weight.dtype
    logits = {layer: {k: torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=k not in frozen)
                      for k, t in ps.items()} for layer, ps in initial.items()}
    params = [p for ps in logits.values() for p in ps.values() if p.requires_grad]
    optimizer = masklearn_optim.make_adamw(params, pruner.config)
    state = {"step": 0}

    def method_step():
        pruner.begin(modules, spec)
        patch = masklearn_gates.MaskedLinears(modules, logits, pruner)
        patch.mode, patch.step = "soft", state["step"]
        patch.sched = pruner.schedule(0)
        state["step"] += 1
        try:
            optimizer.zero_grad(set_to_none=True)
            loss = masklearn_loss.lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            for term in pruner.regularisers(patch.stats, patch.sched)[0]:
                loss = loss + term
            loss.backward()
            optimizer.step()
        finally:
            patch.remove()

    dense_s = seconds(dense_step, device, repeats=repeats)
    leap_s = seconds(method_step, device, repeats=repeats)
    dense_peak, leap_peak = peak_bytes(dense_step, device), peak_bytes(method_step, device)
    return {"batch": batch, "seqlen": seqlen, "repeats": repeats, "dtype": str(dtype).replace("torch.", ""),
            "logits": sum(p.numel() for p in params), "dense_s": dense_s, "leap_s": leap_s,
            "ratio": ratio(leap_s, dense_s), "dense_peak_bytes": dense_peak, "leap_peak_bytes": leap_peak,
            "peak_ratio": ratio(leap_peak, dense_peak)}


def prune_times(model, device, *, methods=ONESHOT, n: int = 16, seqlen: int = 512) -> dict:
    """Each one-shot method's prune time at 50% vs one dense forward pass over its calibration
    tokens; the dense weights are put back after each method."""
    ids = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(1)).to(device)
    modules = all_prunable(model)

    def forward():
        with torch.no_grad():
            for row in ids.split(4):
                model(input_ids=row, use_cache=False)

    dense_s = seconds(forward, device, repeats=3)
    rows = {"calibration": [n, seqlen], "dense_forward_s": dense_s}
    snapshot = snapshot_prunable(model)
    for method in methods:
        ctx = PruneContext(sparsity=SparsitySpec.parse("0.5"), calibration=ids, device=str(device), progress=False,
                           registry=registry)
        try:
            sync(device)
            t0 = time.perf_counter()
            registry.create(method).prune(model, ctx)
            sync(device)
            took = time.perf_counter() - t0
            zeros = sum(int((weight_matrix(m) == 0).sum()) for m in modules.values())
            total = sum(weight_matrix(m).numel() for m in modules.values())
            rows[method] = {"s": took, "ratio": ratio(took, dense_s), "sparsity": zeros / total}
        except Exception as exc:  # one method failing is a finding, not the end of the check
            rows[method] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        finally:
            restore_prunable(model, snapshot)
    return rows


def semi_structured(shapes, device, *, batches=BATCHES, dtype=torch.bfloat16, repeats: int = 50) -> list:
    """Per layer shape and batch: x W^T with W 2:4 through torch's semi-structured sparse tensor vs
    the same W dense, and the largest difference between the two."""
    if torch.device(device).type != "cuda":
        return [{"skipped": "semi-structured sparse tensors need CUDA"}]
    from torch.sparse import to_sparse_semi_structured

    rows = []
    gen = torch.Generator(device=device).manual_seed(2)
    for out_f, in_f in shapes:
        w = two_four(torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen))
        try:
            ws = to_sparse_semi_structured(w)
        except Exception as exc:
            rows.append({"shape": [out_f, in_f], "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            continue
        for b in batches:
            x = torch.randn(b, in_f, device=device, dtype=dtype, generator=gen)
            row = {"shape": [out_f, in_f], "batch": b}
            try:
                dense_s = seconds(lambda: torch.nn.functional.linear(x, w), device, repeats=repeats, warmup=5)
                sparse_s = seconds(lambda: torch.nn.functional.linear(x, ws), device, repeats=repeats, warmup=5)
                diff = (torch.nn.functional.linear(x, ws).float() - torch.nn.functional.linear(x, w).float()).abs().max()
                row.update(dense_us=dense_s * 1e6, sparse_us=sparse_s * 1e6, speedup=ratio(dense_s, sparse_s),
                           max_abs_diff=float(diff))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
    return rows


def decode(model, device, *, tokens: int = 64, prompt_tokens: int = 16, repeats: int = 3) -> dict:
    """Greedy decoding at batch 1: every prunable linear 2:4, first on dense kernels (zeros in
    place), then through semi-structured sparse tensors; the dense weights are put back."""
    modules = all_prunable(model)
    snapshot = snapshot_prunable(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(3))
    prompt = prompt.to(device)

    def generate():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=model.config.eos_token_id)

    out = {"tokens": tokens, "prompt_tokens": prompt_tokens, "batch": 1, "repeats": repeats}
    try:
        with torch.no_grad():
            for m in modules.values():
                m.weight.copy_(two_four(m.weight))
        dense_s = seconds(generate, device, repeats=repeats)
        out["dense_tokens_per_s"] = tokens / dense_s
        if torch.device(device).type != "cuda":
            out["sparse"] = "skipped: semi-structured sparse tensors need CUDA"
            return out
        from torch.sparse import to_sparse_semi_structured

        dense_weights = {}
        try:
            for name, m in modules.items():
                dense_weights[name] = m.weight
                m.weight = torch.nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
            sparse_s = seconds(generate, device, repeats=repeats)
            out.update(sparse_tokens_per_s=tokens / sparse_s, speedup=ratio(dense_s, sparse_s))
        except Exception as exc:
            out["sparse"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        finally:
            for name, w in dense_weights.items():
                modules[name].weight = w
    finally:
        restore_prunable(model, snapshot)
    return out


# ---------------------------------------------------------------------------------------------
# The run

def environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")
    return env


def run_check(specs, device, *, budget_s: float = DEFAULT_BUDGET_S, leap: dict | None = None,
              prune: dict | None = None, decode_kw: dict | None = None, semi: dict | None = None) -> dict:
    """Every section for every model, skipping what would start after the budget; the JSON's content."""
    start = time.perf_counter()
    result = {"check": "gpu_check", **environment(device), "budget_s": budget_s, "models": {}, "skipped": None}
    shapes = set()

    def section(name, fn):
        if time.perf_counter() - start > budget_s:
            return {"skipped": f"time budget of {budget_s:g} s spent before {name}"}
        try:
            return fn()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}

    for spec in specs:
        model, source = load(spec, device, torch.bfloat16)
        shapes.update(layer_shapes(model))
        entry = {"weights": source, "layer_shapes": [list(s) for s in layer_shapes(model)]}
        entry["leap_step"] = section("leap_step", lambda: leap_step(model, device, **(leap or {})))
        entry["prune"] = section("prune", lambda: prune_times(model, device, **(prune or {})))
        entry["decode"] = section("decode", lambda: decode(model, device, **(decode_kw or {})))
        result["models"][spec] = entry
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    result["semi_structured"] = section("semi_structured", lambda: semi_structured(sorted(shapes), device, **(semi or {})))
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file to write (default gpu_check.json)")
    ap.add_argument("--models", default=",".join(EMBEDDED_ARCHS), help="comma-separated (default: the embedded models)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds after which sections not yet started are skipped")
    args = ap.parse_args(argv)
    from prunebench.store.records import atomic_write_json

    if not torch.cuda.is_available():
        atomic_write_json(args.out, {"check": "gpu_check", "skipped": "no CUDA", "torch": torch.__version__})
        print(f"skipped: no CUDA on this machine (wrote {args.out})")
        return 0
    result = run_check([s for s in args.models.split(",") if s], "cuda", budget_s=args.budget)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
