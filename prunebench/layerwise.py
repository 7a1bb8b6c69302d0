"""The sequential block-by-block engine that every layer-wise method shares.

Data pipeline only; the math belongs to the methods.  For each decoder block:
  1. hook its prunable linears and run the calibration inputs through it, accumulating the
     statistics the method asked for (float32, in one place: `StatsAccumulator`);
  2. ask the method for each linear's mask (and repaired weights) and write them back;
  3. run the inputs through the pruned block: its outputs are the next block's inputs.

The first block's real call arguments (rotary embeddings, masks, cache arguments ...) are
captured with a pre-forward hook rather than rebuilt, so every family and transformers version
gets exactly what its own forward would pass.  Only the current block is moved to `ctx.device`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn

from .models import find_blocks, prunable_linears, set_weight_matrix, weight_matrix
from .progress import progress_bar
from .registry import STATS_HESSIAN, STATS_INPUT_NORM, STATS_NONE, LayerStats, PruneContext, PruneReport


class _StopForward(Exception):
    pass


class StatsAccumulator:
    """Running float32 statistics of one linear's inputs: column mean squares or X^T X / n."""

    def __init__(self, in_features: int, kind: str, device):
        self.kind = kind
        self.n_tokens = 0
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device) if kind == STATS_INPUT_NORM else None
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if kind == STATS_HESSIAN else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.n_tokens += x.shape[0]
        if self.sum_sq is not None:
            self.sum_sq += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    def result(self) -> LayerStats:
        n = max(self.n_tokens, 1)
        return LayerStats(
            n_tokens=self.n_tokens,
            input_sq_mean=self.sum_sq / n if self.sum_sq is not None else None,
            hessian=self.xtx / n if self.xtx is not None else None,
        )


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _module_device(module: nn.Module):
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _to(obj, device):
    """Move tensors inside nested args/kwargs (tuples, lists, dicts) to a device."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, device, activation_device="cpu"):
    """Run the model up to its first decoder block for each window.

    Returns (hidden states per window [list of [1, seqlen, hidden]], the block's other positional
    args, its keyword args).  Non-block modules are moved to `device` for the duration; blocks are
    not moved at all.
    """
    _, blocks = find_blocks(model)
    first = blocks[0]
    captured = {"hidden": [], "args": None, "kwargs": None}

    def grab(module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured["hidden"].append(hidden.detach().to(activation_device))
        if captured["args"] is None:
            captured["args"] = _to(rest, "cpu")
            captured["kwargs"] = {k: _to(v, "cpu") for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    # Everything that runs before block 0 (embeddings, rotary tables) goes to the device.
    block_ids = {id(b) for b in blocks}
    outer = _non_block_modules(model, block_ids)
    original = [(m, _module_device(m)) for m in outer]
    for m in outer:
        m.to(device)
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        for m, dev in original:
            m.to(dev)
    return captured["hidden"], captured["args"], captured["kwargs"]


def _non_block_modules(model: nn.Module, block_ids: set):
    """Leaf-most modules outside the decoder blocks (so moving them never moves a block)."""
    out = []

    def walk(module):
        for child in module.children():
            if id(child) in block_ids:
                continue
            if isinstance(child, nn.ModuleList) and any(id(c) in block_ids for c in child):
                continue
            if any(id(m) in block_ids for m in child.modules()):
                walk(child)
            else:
                out.append(child)

    walk(model)
    return out


def run_block(block: nn.Module, hidden: list, args, kwargs, device, activation_device="cpu") -> list:
    outs = []
    args_d, kwargs_d = _to(args, device), _to(kwargs, device)
    with torch.no_grad():
        for h in hidden:
            out = block(h.to(device), *args_d, **kwargs_d)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.to(activation_device))
    return outs


def _check_linear_result(name: str, result, weight: torch.Tensor) -> None:
    """A method's answer for one matrix must be a bool keep-mask (and weights) of its shape: a
    float mask would scale the weights instead of pruning them."""
    mask = getattr(result, "mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name}: prune_linear must return a bool keep-mask, got "
                        f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} differs from the weight's {tuple(weight.shape)}")
    if result.weight is not None and tuple(result.weight.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: returned weight shape {tuple(result.weight.shape)} differs from {tuple(weight.shape)}")


def prune_layerwise(model: nn.Module, pruner, ctx: PruneContext) -> PruneReport:
    """Prune every decoder linear with `pruner.prune_linear`, block by block, sequentially."""
    spec = ctx.sparsity.resolved(pruner.default_scope)
    kind = pruner.capabilities.statistics
    prefix, blocks = find_blocks(model)
    report = PruneReport(stats={"per_block_s": [], "scope": spec.scope})
    device = torch.device(ctx.device)
    activation_device = ctx.extras.get("activation_device", "cpu")
    t0 = time.perf_counter()

    hidden = args = kwargs = None
    if kind != STATS_NONE:
        if ctx.calibration is None:
            raise ValueError(f"method {pruner.name!r} needs calibration windows")
        hidden, args, kwargs = capture_block_inputs(model, ctx.calibration, device, activation_device)
    report.stats["capture_s"] = time.perf_counter() - t0

    bar = progress_bar(total=len(blocks), desc=f"{pruner.name} blocks", enabled=ctx.progress, unit="block")
    for index, block in enumerate(blocks):
        tb = time.perf_counter()
        home = _module_device(block)
        block.to(device)
        linears = prunable_linears(block)
        stats = {}
        if kind != STATS_NONE:
            accumulators = {name: StatsAccumulator(weight_matrix(m).shape[1], kind, device) for name, m in linears.items()}
            handles = [m.register_forward_hook(lambda mod, inp, out, acc=accumulators[name]: acc.add(inp[0]))
                       for name, m in linears.items()]
            with _hooks(handles):
                run_block(block, hidden, args, kwargs, device, activation_device)
            stats = {name: acc.result() for name, acc in accumulators.items()}
            del accumulators
        for name, module in linears.items():
            full_name = f"{prefix}.{index}.{name}"
            weight = weight_matrix(module).detach().to(device=device, dtype=torch.float32, copy=True).contiguous()
            result = pruner.prune_linear(weight, stats.get(name, LayerStats(n_tokens=0)), spec, ctx)
            new_weight = result.weight if result.weight is not None else weight
            _check_linear_result(full_name, result, weight)
            mask = result.mask.to(new_weight.device)
            set_weight_matrix(module, new_weight * mask)
            report.warnings.extend(f"{full_name}: {w}" for w in result.warnings)
        stats.clear()
        if kind != STATS_NONE and index + 1 < len(blocks):
            hidden = run_block(block, hidden, args, kwargs, device, activation_device)
        block.to(home)
        report.stats["per_block_s"].append(round(time.perf_counter() - tb, 4))
        bar.update(1)
    bar.close()
    return report
