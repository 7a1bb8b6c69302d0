"""The sequential block-by-block engine that every layer-wise method shares.

Data pipeline only; the math belongs to the methods, which subclass `LayerwisePruner` (at the
end of this file) and supply one matrix's mask.  For each decoder block:
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
from typing import ClassVar

import torch
from torch import nn

from prunebench.contract import (
    STATS_HESSIAN, STATS_INPUT_MOMENTS, STATS_INPUT_NORM, STATS_NONE, LayerStats, LinearResult, PruneContext, Pruner,
    PruneReport, stats_kinds
)
from prunebench.modeling.models import find_blocks, prunable_linears, set_weight_matrix, weight_matrix
from prunebench.progress import progress_bar
from prunebench.sparsity.patterns import SparsitySpec


class _StopForward(Exception):
    pass


# Calibration windows per block forward.  Bigger batches run bigger matmuls (the engine's floor
# is two block passes over the calibration tokens); 8 x 512 tokens x 1536 features x 4 bytes is
# 25 MB of MLP activations, small next to the stored block inputs.  PruneContext.extras
# ["block_batch"] overrides it.
BLOCK_BATCH_WINDOWS = 8


# X^T X is symmetric: above this width it is accumulated block row by block row from the diagonal
# rightwards and mirrored, 55-67% of a full product's multiply-adds (the calibration Hessians are
# most of SparseGPT's and ADMM's arithmetic beyond the two block passes).
GRAM_BLOCK = 192


def gram_add_(out: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """out += x^T x for x [tokens, n], computing only the upper block triangle."""
    n = x.shape[1]
    if n < 2 * block:
        return out.addmm_(x.t(), x)
    for i in range(0, n, block):
        j = min(i + block, n)
        upper = x[:, i:j].t() @ x[:, i:]  # [block, n - i]: the diagonal block and those right of it
        out[i:j, i:] += upper
        out[j:, i:j] += upper[:, j - i:].t()
    return out


class StatsAccumulator:
    """Running float32 statistics of one linear's inputs: column mean squares, column means and
    mean squares (input_moments), X^T X / n, or several of them ("hessian+input_moments")."""

    def __init__(self, in_features: int, kind: str, device):
        self.kind = kind
        kinds = stats_kinds(kind)
        self.n_tokens = 0

        def zeros(*shape, when):
            return torch.zeros(*shape, dtype=torch.float32, device=device) if when else None

        self.sum_sq = zeros(in_features, when=bool(kinds & {STATS_INPUT_NORM, STATS_INPUT_MOMENTS}))
        self.sum = zeros(in_features, when=STATS_INPUT_MOMENTS in kinds)
        self.xtx = zeros(in_features, in_features, when=STATS_HESSIAN in kinds)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.n_tokens += x.shape[0]
        if self.sum_sq is not None:
            self.sum_sq += (x * x).sum(dim=0)
        if self.sum is not None:
            self.sum += x.sum(dim=0)
        if self.xtx is not None:
            gram_add_(self.xtx, x)

    def result(self) -> LayerStats:
        n = max(self.n_tokens, 1)
        return LayerStats(
            n_tokens=self.n_tokens,
            input_sq_mean=self.sum_sq / n if self.sum_sq is not None else None,
            hessian=self.xtx / n if self.xtx is not None else None,
            input_mean=self.sum / n if self.sum is not None else None,
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


def batch_windows(hidden: list, size: int) -> list:
    """Concatenate per-window hidden states [1, seqlen, h] into batches of `size` windows.

    One block forward over several windows runs bigger matmuls than one window at a time (the
    reference implementations' loop), which is most of the engine's floor on a CPU.
    """
    size = max(1, int(size))
    return [torch.cat(hidden[i:i + size], dim=0) if size > 1 else hidden[i] for i in range(0, len(hidden), size)]


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


def collect_block_stats(block: nn.Module, linears: dict, kind: str, hidden: list, args, kwargs, device,
                        activation_device="cpu", keep_outputs: bool = False):
    """One pass of `block` over the calibration batches, accumulating `kind` statistics.

    Linears that read the same input tensor (q/k/v after the attention norm, gate/up after the
    MLP norm) share one accumulator: their statistics are identical, so they are computed once
    and the method may solve them together (SparseGPT factorises one Hessian for q, k and v).
    Sharing is detected by tensor identity on the first batch (the tensors are held alive for
    that batch, so a freed buffer can never be mistaken for a shared one).  The first batch also
    shows which linear runs last; on the later batches the forward stops at its input (its
    product and the rest of the block are not needed for statistics), unless `keep_outputs`.

    `kind` is a Capabilities.statistics string (kinds joined by "+" are accumulated in one pass).
    Returns (groups, stats, outputs): groups is a list of name lists in execution order, stats
    maps the first name of each group to its LayerStats, outputs the block's outputs per batch
    (only with keep_outputs, else None).
    """
    names = list(linears)
    seen: dict = {}
    order: list = []
    accumulators = {name: StatsAccumulator(weight_matrix(m).shape[1], kind, device) for name, m in linears.items()}
    state = {"first": True, "stop_at": None}

    def hook(name):
        def fn(mod, inp):
            if state["first"]:
                seen[name] = inp[0]
                order.append(name)
            acc = accumulators.get(name)
            if acc is not None:
                acc.add(inp[0])
            if name == state["stop_at"]:
                raise _StopForward
        return fn

    outputs = [] if keep_outputs else None
    groups = [[n] for n in names]
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    with _hooks(handles):
        for i, h in enumerate(hidden):
            try:
                out = run_block(block, [h], args, kwargs, device, activation_device)
                if keep_outputs:
                    outputs.extend(out)
            except _StopForward:
                pass
            if i == 0:
                state["first"] = False
                if not keep_outputs and order and len(set(order)) == len(order) == len(names):
                    state["stop_at"] = order[-1]  # every linear ran once: stop at the last one's input
                groups = []
                for name in sorted(names, key=lambda n: order.index(n) if n in order else len(order)):
                    for g in groups:
                        if seen.get(name) is not None and seen.get(g[0]) is seen.get(name):
                            g.append(name)
                            del accumulators[name]  # same input: the leader's accumulator covers it
                            break
                    else:
                        groups.append([name])
                seen.clear()
    return groups, {g[0]: accumulators[g[0]].result() for g in groups}, outputs


def stack_rows(weights: dict) -> tuple:
    """The [out, in] matrices of a group that shares one input, stacked row-wise, and each
    one's (start, stop) rows: a method solves the group as one matrix, then splits by them."""
    names = list(weights)
    stacked = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
    bounds, start = {}, 0
    for n in names:
        bounds[n] = (start, start + weights[n].shape[0])
        start += weights[n].shape[0]
    return stacked, bounds


def _check_linear_result(name: str, result, weight: torch.Tensor) -> None:
    """A method's answer for one matrix must be a bool keep-mask (and weights) of its shape: a
    float mask would scale the weights instead of pruning them."""
    if not hasattr(result, "mask"):  # a bare mask, None, a tuple ...: say what came and what to return
        what = f"a bare {result.dtype} tensor" if isinstance(result, torch.Tensor) else type(result).__name__
        raise TypeError(f"{name}: prune_linear returned {what}; return LinearResult(mask=<bool keep-mask>) "
                        "(with weight=<new weights> if it changes the weights it keeps)")
    mask = getattr(result, "mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name}: prune_linear must return a bool keep-mask, got "
                        f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} differs from the weight's {tuple(weight.shape)}")
    if result.weight is not None and tuple(result.weight.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: returned weight shape {tuple(result.weight.shape)} differs from {tuple(weight.shape)}")


def _zero_count(module) -> tuple:
    w = weight_matrix(module)
    return int((w == 0).sum()), w.numel()


def prune_layerwise(model: nn.Module, pruner, ctx: PruneContext) -> PruneReport:
    """Prune every decoder linear with `pruner.prune_group`, block by block, sequentially.

    With a per-layer allocation attached to the pruner (`pruner.allocation`, e.g. OWL), each
    block gets its own target from the allocation (prunebench.engines.allocation.Allocation.allocate)
    before any block is pruned; the default is the same spec for every block.
    """
    spec = ctx.sparsity.resolved(pruner.default_scope)
    kind = pruner.capabilities.statistics
    allocation = getattr(pruner, "allocation", None)
    prefix, blocks = find_blocks(model)
    # updates_weights: whether any LinearResult carried new weights (the output checks then allow
    # the kept weights to move; see Capabilities.updates_weights)
    report = PruneReport(stats={"per_block_s": [], "scope": spec.scope}, updates_weights=False, masks={})
    device = torch.device(ctx.device)
    activation_device = ctx.extras.get("activation_device", "cpu")
    batch = int(ctx.extras.get("block_batch", BLOCK_BATCH_WINDOWS))
    t0 = time.perf_counter()

    hidden = args = kwargs = None
    needs_inputs = kind != STATS_NONE or (allocation is not None and allocation.statistics != STATS_NONE)
    if needs_inputs:
        if ctx.calibration is None:
            raise ValueError(f"method {pruner.name!r} needs calibration windows")
        hidden, args, kwargs = capture_block_inputs(model, ctx.calibration, device, activation_device)
        hidden = batch_windows(hidden, batch)
    report.stats["capture_s"] = time.perf_counter() - t0

    block_specs = [spec] * len(blocks)
    if allocation is not None:
        ta = time.perf_counter()
        block_specs, info = allocation.allocate(blocks, spec, hidden, args, kwargs, device, activation_device,
                                                progress=ctx.progress)
        info["seconds"] = round(time.perf_counter() - ta, 3)
        report.stats["allocation"] = info
        report.layer_specs = {}
    block_achieved = []

    bar = progress_bar(total=len(blocks), desc=f"{pruner.name} blocks", enabled=ctx.progress, unit="block")
    for index, block in enumerate(blocks):
        tb = time.perf_counter()
        home = _module_device(block)
        block.to(device)
        linears = prunable_linears(block)
        block_spec = block_specs[index]
        if kind != STATS_NONE:
            groups, stats, _ = collect_block_stats(block, linears, kind, hidden, args, kwargs, device, activation_device)
        else:
            groups, stats = [[name] for name in linears], {}
        for group in groups:
            weights = {name: weight_matrix(linears[name]).detach().to(device=device, dtype=torch.float32, copy=True).contiguous()
                       for name in group}
            layer_stats = stats.get(group[0], LayerStats(n_tokens=0))
            results = pruner.prune_group(weights, layer_stats, block_spec, ctx)
            for name in group:
                full_name = f"{prefix}.{index}.{name}"
                result = results[name]
                _check_linear_result(full_name, result, weights[name])
                if result.weight is not None:  # observed here, so no method has to declare it
                    report.updates_weights = True
                new_weight = result.weight if result.weight is not None else weights[name]
                set_weight_matrix(linears[name], new_weight * result.mask.to(new_weight.device))
                # the output checks count this mask, not the weights' zeros (the dense model has some)
                report.masks[full_name] = result.mask.to("cpu")
                report.warnings.extend(f"{full_name}: {w}" for w in result.warnings)
                if report.layer_specs is not None:
                    report.layer_specs[full_name] = block_spec
            del weights, results
        stats.clear()
        if allocation is not None:
            counts = [_zero_count(m) for m in linears.values()]
            block_achieved.append(round(sum(z for z, _ in counts) / max(sum(n for _, n in counts), 1), 6))
        if needs_inputs and index + 1 < len(blocks):
            hidden = run_block(block, hidden, args, kwargs, device, activation_device)
        block.to(home)
        report.stats["per_block_s"].append(round(time.perf_counter() - tb, 4))
        bar.update(1)
    bar.close()
    if allocation is not None:
        report.stats["allocation"]["block_achieved"] = block_achieved
    return report


class LayerwisePruner(Pruner):
    """A method that prunes one linear at a time from statistics of its inputs.

    This engine owns the block loop, the hooks and the statistics (prune_layerwise); the method
    supplies only `prune_linear`.
    """

    kind: ClassVar[str] = "layer-wise"
    default_scope: ClassVar[str] = "row"  # for unstructured specs that do not name a scope
    engine_modules: ClassVar[tuple] = ("prunebench.engines.layerwise",)
    accepts_allocation: ClassVar[bool] = True  # prune_layerwise spends a per-block allocation

    def prune_linear(self, weight: torch.Tensor, stats: LayerStats, spec: SparsitySpec,
                     ctx: PruneContext) -> LinearResult:
        """weight: float32 [out, in] copy. Return the keep-mask and optionally new weights."""
        raise NotImplementedError

    def prune_group(self, weights: dict, stats: LayerStats, spec: SparsitySpec, ctx: PruneContext) -> dict:
        """Linears of one block that read the same input (q/k/v, gate/up) and so share `stats`.

        weights: name -> float32 [out, in] copy.  Returns name -> LinearResult.  The default
        prunes them one by one; a method that can share work across the group (one Hessian
        factorisation) overrides it.
        """
        return {name: self.prune_linear(w, stats, spec, ctx) for name, w in weights.items()}

    def prune(self, model, ctx: PruneContext) -> PruneReport:
        self.check_spec(ctx.sparsity)
        return prune_layerwise(model, self, ctx)  # it also reports whether new weights were returned
