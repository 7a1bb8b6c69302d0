"""Parity of prunebench's DSnoT (methods/dsnot.py) with the authors' code, on real layer inputs.

Captures the inputs of a few linears of SmolLM2-135M (embedded model, Lee calibration windows, the
dense model's own inputs to decoder block `--block`), then prunes the same weights from the same
initial Wanda mask with our swap loop (dsnot.dsnot_swap on the engine's statistics) and with the
authors' prune_DSnoT (lib/prune.py of a checkout of zyxxmu/DSnoT, imported at run time; never
shipped here), and prints the mask agreement, how many swaps each made and how many coincide, the
expected error sum_i |e_i| DSnoT minimises, and the relative output reconstruction error
tr(D H D^T) / tr(W H W^T) (D = W - W_hat, H = X^T X / n) of the Wanda mask and of both results.
Not part of the test suite.

    git --git-dir=<mirror of zyxxmu/DSnoT> archive 4c029df lib | tar -x -C /tmp/dsnot-4c029df
    python benchmarks/parity/dsnot.py --reference /tmp/dsnot-4c029df

Their prune_DSnoT runs whole: a stand-in model whose one decoder block feeds each linear the
captured inputs of window j (its hidden state carries j), their WrappedGPT hooks, their Wanda
initial mask and their loop, with --skip_layer no_skip (every linear, the paper) and the rest of
main.py's defaults.  Nothing of theirs is stubbed: get_loaders, which would download C4, is handed
our windows instead (that is the point: the same windows through both).  Two runs of theirs:
  * "same stats": their WrappedGPT's statistics replaced by ours after each batch (E[x] as their
    window sum seqlen * E[x], the input norm, Var over all tokens): the same initial mask and
    statistics, so any difference is the loop itself;
  * "own stats": their statistics as they compute them (Var pooled within windows).
Weights that are exactly zero in the dense model are left out of the agreement (a pruned weight
is read back as a zero).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

REFERENCE_PACKAGE = "dsnot_reference_lib"


def load_reference(checkout: Path):
    """Their lib/prune.py as the module `dsnot_reference_lib.prune` (lib/ has no __init__.py)."""
    lib = checkout.expanduser() / "lib"
    if not (lib / "prune.py").is_file():
        raise SystemExit(f"{lib / 'prune.py'} not found: --reference must be a checkout of zyxxmu/DSnoT")
    package = types.ModuleType(REFERENCE_PACKAGE)
    package.__path__ = [str(lib)]
    sys.modules[REFERENCE_PACKAGE] = package
    return importlib.import_module(f"{REFERENCE_PACKAGE}.prune")


def layer_inputs(model_spec, block_index, names, n_samples, seqlen):
    """{name: (weight [out, in] float32, [per window [seqlen, in] inputs])} for linears of one block."""
    from prunebench.modeling.models import weight_matrix

    from block_inputs import block_at, record_inputs

    block, linears, hidden, args, kwargs = block_at(model_spec, block_index, names, n_samples, seqlen)
    seen = record_inputs(block, linears, hidden, args, kwargs)
    return {n: (weight_matrix(m).detach().float().clone(), [x[0] for x in seen[n]]) for n, m in linears.items()}


def our_stats(xs):
    """The engine's statistics of one linear's inputs: mean, mean square, Hessian (float32)."""
    from prunebench.engines.layerwise import StatsAccumulator
    from prunebench.contract import STATS_HESSIAN, STATS_INPUT_MOMENTS, combine_stats

    acc = StatsAccumulator(xs[0].shape[1], combine_stats(STATS_HESSIAN, STATS_INPUT_MOMENTS), "cpu")
    for x in xs:
        acc.add(x)
    return acc.result()


class _Layer(nn.Module):
    """A decoder block whose forward feeds every linear its captured input of window j (the
    hidden state is [1, 1, 1] holding j) and passes the hidden state on."""

    def __init__(self, data):
        super().__init__()
        self.names = list(data)
        self.inputs = {n: xs for n, (_, xs) in data.items()}
        parts = {}
        for name, (w, _) in data.items():
            outer, inner = name.split(".")
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            parts.setdefault(outer, nn.ModuleDict())[inner] = lin
        for outer, mods in parts.items():
            self.add_module(outer, mods)

    def forward(self, hidden, attention_mask=None, position_ids=None):
        j = int(round(float(hidden.reshape(-1)[0])))
        for name in self.names:
            outer, inner = name.split(".")
            getattr(self, outer)[inner](self.inputs[name][j].unsqueeze(0))
        return (hidden,)


class _Model(nn.Module):
    def __init__(self, layer, seqlen):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])
        self.config = SimpleNamespace(use_cache=False, hidden_size=1)
        self.hf_device_map = {}
        self.seqlen = 1  # their inps buffer: one "token" holding the window index

    def forward(self, ids):
        self.model.layers[0](ids.float().reshape(1, 1, 1), attention_mask=None, position_ids=None)


def theirs(reference, data, stats, spec, seqlen, same_stats, max_cycle=50, threshold=0.1):
    """The authors' prune_DSnoT on our inputs; returns ({name: pruned weight}, seconds)."""
    n = len(next(iter(data.values()))[1])
    layer = _Layer(data)
    model = _Model(layer, seqlen)
    reference.get_loaders = lambda *a, **k: ([(torch.tensor([[j]]),) for j in range(n)], None)
    base = reference.WrappedGPT
    by_module = {id(mod): name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}

    class SameStats(base):  # their statistics replaced by ours, in their units
        def add_batch(self, inp, out):
            super().add_batch(inp, out)
            st = stats[by_module[id(self.layer)]]
            self.sum_metric_row = st.input_mean * seqlen  # sum over a window, averaged over windows
            self.scaler_row = st.input_sq_mean * seqlen
            self.var = st.input_var.unsqueeze(1)

    reference.WrappedGPT = SameStats if same_stats else base
    prune_n, prune_m = (spec.m - spec.n, spec.m) if spec.pattern == "nm" else (0, 0)
    args = SimpleNamespace(nsamples=n, seed=0, initial_method="wanda", sparsity_ratio=spec.target,
                           max_cycle_time=max_cycle, update_threshold=threshold, pow_of_var_regrowing=1,
                           skip_layer="no_skip", skip_sub_layer="no_skip", without_DSnoT=False,
                           without_same_sign=True, get_time_overhead=False)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            reference.prune_DSnoT(args, model, None, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
    finally:
        reference.WrappedGPT = base
    seconds = time.perf_counter() - t0
    return {name: getattr(layer, name.split(".")[0])[name.split(".")[1]].weight.data.clone() for name in data}, seconds


def rel_error(W, keep, H) -> float:
    D = W * ~keep
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="a checkout of zyxxmu/DSnoT (lib/prune.py)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="3,20", help="decoder blocks whose linears are compared")
    parser.add_argument("--layers", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    parser.add_argument("--specs", default="0.5,0.6,2:4", help="unstructured targets (per row) and N:M patterns")
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from prunebench.methods.dsnot import dsnot_swap
    from prunebench.methods.wanda import wanda_scores
    from prunebench.sparsity.patterns import SparsitySpec, mask_from_scores

    torch.set_num_threads(args.threads)
    reference = load_reference(args.reference)
    names = [n.strip() for n in args.layers.split(",") if n.strip()]
    print(f"{args.model}, {args.n_samples} x {args.seqlen} Lee tokens; reference {args.reference}; "
          "max_cycle 50, update_threshold 0.1 (per window), initial Wanda, every linear")
    print(f"{'block':>5} {'layer':<16} {'spec':<4} {'stats':<10} {'agree':>9} {'rows same':>9} {'swaps us':>8} "
          f"{'them':>6} {'common':>6} {'sum|e| wanda':>12} {'us':>8} {'them':>8} {'err wanda':>9} {'us':>8} {'them':>8}")
    for block in [int(b) for b in args.blocks.split(",")]:
        data = layer_inputs(args.model, block, names, args.n_samples, args.seqlen)
        stats = {n: our_stats(xs) for n, (_, xs) in data.items()}
        for text in args.specs.split(","):
            spec = SparsitySpec.parse(text.strip()).resolved("row")
            ours, t_ours = {}, 0.0
            for name, (W, _) in data.items():
                st = stats[name]
                keep0 = mask_from_scores(wanda_scores(W, st.input_norm), spec)
                t0 = time.perf_counter()
                keep, _, _ = dsnot_swap(W, keep0, st.input_mean, st.input_var, st.input_norm, window=args.seqlen,
                                        group=spec.m if spec.pattern == "nm" else 0, sign_stop=spec.pattern == "nm")
                t_ours += time.perf_counter() - t0
                ours[name] = (keep0, keep)
            for label, same in (("same", True), ("own", False)):
                ref, t_ref = theirs(reference, data, stats, spec, args.seqlen, same)
                for name, (W, _) in data.items():
                    st, (keep0, keep) = stats[name], ours[name]
                    known = W != 0
                    them = (ref[name] != 0) | ~known
                    agree = float((keep == them)[known].float().mean())
                    rows = float(((keep == them) | ~known).all(1).float().mean())
                    ch_us, ch_them = (keep != keep0) & known, (them != keep0) & known
                    metric = W * st.input_mean * args.seqlen
                    e = [float((metric * ~k).sum(1).abs().sum()) for k in (keep0, keep, them)]
                    H = st.hessian
                    err = [rel_error(W, k, H) for k in (keep0, keep, them)]
                    print(f"{block:>5} {name:<16} {spec.label:<4} {label + ' stats':<10} {agree:>9.6f} {rows:>9.4f} "
                          f"{int(ch_us.sum()) // 2:>8} {int(ch_them.sum()) // 2:>6} {int((ch_us & ch_them).sum()) // 2:>6} "
                          f"{e[0]:>12.2f} {e[1]:>8.2f} {e[2]:>8.2f} {err[0]:>9.5f} {err[1]:>8.5f} {err[2]:>8.5f}")
                print(f"      time {spec.label} ({label} stats): ours {t_ours:.2f} s, theirs {t_ref:.2f} s "
                      f"(theirs includes their statistics pass)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
