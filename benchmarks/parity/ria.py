"""Mask parity of prunebench's RIA (methods/ria.py) with the authors' prune_ria, on real layer inputs.

The authors' code (biomedical-cybernetics/Relative-importance-and-activation-pruning, lib/prune.py)
is imported at run time from a local checkout (`--reference-checkout`), never shipped here:

    git clone https://github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning /tmp/ria-ref
    # or, from a bare mirror:  mkdir /tmp/ria-ref && git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/ria-ref
    python benchmarks/parity/ria.py --reference-checkout /tmp/ria-ref
    python benchmarks/parity/ria.py --reference-checkout /tmp/ria-ref --blocks 0,29 --linears q_proj,down_proj

What it does: runs the dense embedded model (SmolLM2-135M, prunebench's loader) over a few Lee
calibration windows and records the inputs of a few linears.  For each linear, both sides get the
same weight and the same inputs:
  * ours: the engine's own statistic (prunebench.engines.layerwise.StatsAccumulator -> LayerStats) and
    RIA().prune_linear, with selection "exact" (the default) and "reference";
  * theirs: their prune_ria itself, called on a stand-in "llama" model of one block holding that one
    linear, whose calibration windows are the recorded inputs; their WrappedGPT accumulates the
    statistic, their code scores and selects, and their pruned weight is read back.
Stubs (nothing else is replaced): their get_loaders (it would download C4) returns the recorded
inputs; without CUDA, Tensor.cuda is the identity during the call (their layer threshold moves the
flattened scores to the GPU and back).  Their module's imports are all used as they are.

Printed per linear and spec: weights pruned by each side and how many decisions differ.  Weights that
are exactly zero in the dense model are counted as pruned on both sides (their mask is read back
from the zeros).  `--reallocation` also compares the channel-permutation heuristic for 2:4 (their
`--reallocation`, ours zigzag_permutation + permuted_nm_mask); their `--lsa` is hard-wired to the
device "cuda:7" and is not compared.  Their statistic is ours times a constant (sqrt of the tokens
per window, to the power a), so the masks agree mathematically; selection "reference" can still
differ on exact ties or 1-ulp near-ties of that rounding (a row boundary, or two equal column sums
that their unstable sort orders the other way in the reallocation).  Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

REFERENCE_PACKAGE = "ria_reference_lib"


def load_reference(checkout: Path):
    """Their lib/prune.py as the module `ria_reference_lib.prune` (lib/ has no __init__.py)."""
    lib = checkout.expanduser() / "lib"
    if not (lib / "prune.py").is_file():
        raise SystemExit(f"{lib / 'prune.py'} not found: --reference-checkout must be a checkout of "
                         "biomedical-cybernetics/Relative-importance-and-activation-pruning")
    package = types.ModuleType(REFERENCE_PACKAGE)
    package.__path__ = [str(lib)]
    sys.modules[REFERENCE_PACKAGE] = package
    return importlib.import_module(f"{REFERENCE_PACKAGE}.prune")


class _Block(nn.Module):
    """One decoder block holding one linear: its forward feeds the linear (their hooks see its input)
    and passes the hidden state on unchanged, so their inps/outs buffers keep one width."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, hidden, attention_mask=None, position_ids=None):
        self.proj(hidden)
        return (hidden,)


class _Model(nn.Module):
    """What their prune_ria reads from a llama model: model.layers, config, seqlen, hf_device_map."""

    def __init__(self, linear: nn.Linear, seqlen: int):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block(linear)])
        self.config = SimpleNamespace(use_cache=False, hidden_size=linear.in_features)
        self.seqlen = seqlen
        self.hf_device_map = {}

    def forward(self, hidden):
        return self.model.layers[0](hidden, attention_mask=None, position_ids=None)


def reference_mask(reference, weight: torch.Tensor, inputs: list, spec, a: float, per_outneuron: bool,
                   reallocation: bool = False) -> torch.Tensor:
    """Keep-mask from the authors' prune_ria on one linear (weight [out, in], inputs [1, seqlen, in] each)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    seqlen = inputs[0].shape[1]
    model = _Model(linear, seqlen)
    # Their N counts pruned weights ("2:4" -> prune_n=2 of every 4); prunebench's counts kept ones.
    prune_n, prune_m = (spec.m - spec.n, spec.m) if spec.pattern == "nm" else (0, 0)
    args = SimpleNamespace(model="llama-parity", calib_dataset="c4", nsamples=len(inputs), seed=0, seqlen=seqlen,
                           prune_method="ria", a=a, sparsity_ratio=spec.target if spec.pattern != "nm" else 0.5,
                           per_outneuron=per_outneuron, reconstruction=False, gptq=False, reallocation=reallocation,
                           lsa=False, importance_score="sum", fast=False, semi_sparse_acc=False)
    reference.get_loaders = lambda *a_, **k_: ([(x,) for x in inputs], None)
    saved_cuda = torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a_, **k_: self
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # their progress prints
            reference.prune_ria(args, model, None, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
    finally:
        torch.Tensor.cuda = saved_cuda
    return linear.weight.data != 0


def capture_inputs(model, windows, names):
    """Inputs of the named linears over the windows: name -> list of [1, seqlen, in] float32."""
    modules = dict(model.named_modules())
    captured = {name: [] for name in names}
    handles = [modules[name].register_forward_pre_hook(
        lambda mod, inp, name=name: captured[name].append(inp[0].detach().float().clone())) for name in names]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-checkout", required=True, help="checkout of the authors' repository")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", default="0,15,29")
    p.add_argument("--linears", default="self_attn.q_proj,self_attn.k_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    p.add_argument("--specs", default="0.5,0.6,2:4")
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-outneuron", action="store_true", help="also compare per-row selection (their --per_outneuron)")
    p.add_argument("--reallocation", action="store_true", help="also compare 2:4 with their heuristic channel reallocation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from prunebench import registry
    from prunebench.data.windows import WindowSpec, calibration_windows
    from prunebench.engines.layerwise import StatsAccumulator
    from prunebench.modeling.models import find_blocks, load_model
    from prunebench.contract import STATS_INPUT_NORM
    from prunebench.sparsity.patterns import SparsitySpec

    registry.available()
    from prunebench.methods.ria import permuted_nm_mask, ria_scores, zigzag_permutation

    reference = load_reference(Path(args.reference_checkout))
    loaded = load_model(args.model)
    windows, fingerprint = calibration_windows(loaded.tokenizer, WindowSpec("lee", args.n_samples, args.seqlen, 0))
    prefix, _ = find_blocks(loaded.model)
    names = [f"{prefix}.{b}.{lin}" for b in args.blocks.split(",") for lin in args.linears.split(",")]
    inputs = capture_inputs(loaded.model, windows, names)
    modules = dict(loaded.model.named_modules())
    print(f"model {args.model}, {args.n_samples} Lee windows x {args.seqlen} tokens (fingerprint {fingerprint[:12]}), "
          f"torch {torch.__version__}")

    variants = [(spec, False) for spec in args.specs.split(",")]
    if args.per_outneuron:
        variants += [(spec, True) for spec in args.specs.split(",") if ":" not in spec]
    totals = {}
    header = f"{'linear':34} {'shape':>10} {'spec':>10} {'selection':>9} {'pruned ours':>11} {'theirs':>7} {'differ':>6} {'agreement':>10}"
    print(header)
    print("-" * len(header))
    for name in names:
        weight = modules[name].weight.detach().float().clone()
        acc = StatsAccumulator(weight.shape[1], STATS_INPUT_NORM, "cpu")
        for x in inputs[name]:
            acc.add(x)
        stats = acc.result()
        dense_zero = weight == 0
        rows = []
        for text, per_row in variants:
            spec = SparsitySpec.parse(text)
            theirs = reference_mask(reference, weight, inputs[name], spec, 0.5, per_row)
            for selection in ("exact", "reference"):
                pruner = registry.create("ria", {"selection": selection, "per_outneuron": per_row})
                ours = pruner.prune_linear(weight.clone(), stats, spec.resolved(pruner.default_scope), None).mask
                rows.append((text + ("@row" if per_row else ""), selection, ours & ~dense_zero, theirs))
        if args.reallocation:
            spec = SparsitySpec.parse("2:4")
            theirs = reference_mask(reference, weight, inputs[name], spec, 0.5, False, reallocation=True)
            scores = ria_scores(weight, stats.input_norm)
            ours = permuted_nm_mask(scores, zigzag_permutation(scores, spec.m), spec.n, spec.m)
            rows.append(("2:4+realloc", "exact", ours & ~dense_zero, theirs))
        for label, selection, ours, theirs in rows:
            differ = int((ours != theirs).sum())
            t = totals.setdefault((label, selection), [0, 0])
            t[0] += differ
            t[1] += ours.numel()
            print(f"{name:34} {'x'.join(map(str, weight.shape)):>10} {label:>10} {selection:>9} {int((~ours).sum()):>11} "
                  f"{int((~theirs).sum()):>7} {differ:>6} {100 * (1 - differ / ours.numel()):>9.4f}%")
        if int(dense_zero.sum()):
            print(f"{'':34} ({int(dense_zero.sum())} weights exactly zero in the dense model)")
    print("\noverall")
    for (label, selection), (differ, n) in totals.items():
        print(f"  {label:>12} {selection:>9}: {differ} of {n} decisions differ, agreement {100 * (1 - differ / n):.4f}%")


if __name__ == "__main__":
    main()
