"""Measured inference speed of a pruned model on this machine, beside the dense kernels.

Every prunable linear runs through the fastest kernel found for its own weight among those that
exist here (`KERNELS`: dense matmul, torch sparse CSR and BSR, scipy CSR), chosen by timing each
on that weight at the batch being measured; the model then decodes greedily at batch 1 with its
KV cache, and tokens per second are compared with the same model on dense kernels.  Fixed thread
count, warm-ups, median of repeats.  A speedup below 1 is reported as it is: a 50% unstructured
mask is usually slower through CPU sparse kernels than dense.

A record keeps each linear's kept count and pattern, not its mask (run --save-masks for those),
so `masks_like` draws masks with exactly the record's per-linear counts and pattern at random
positions, on the model's real weights.  What a CSR kernel costs depends on the number of kept
weights per row, not on which ones, so this measures the record's cost; block formats (BSR) see
the positions and may do better on a real mask with structure.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch

from prunebench.modeling.models import all_prunable, weight_matrix
from prunebench.sparsity.pattern_registry import pattern_of

KERNELS = ("dense", "torch-csr", "torch-bsr", "scipy-csr")
BSR_BLOCK = 16  # torch BSR block side (only blocks holding a kept weight are stored)
DECODE_TOKENS = 32
PROMPT_TOKENS = 16
PICK_REPEATS = 5  # timings per kernel and linear when choosing


def kernel(name: str, weight: torch.Tensor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """y = x W^T for x [tokens, in] through kernel `name`, or None where it cannot be built here."""
    w = weight.detach().float().contiguous()
    try:
        if name == "dense":
            return lambda x: torch.nn.functional.linear(x, w)
        if name == "torch-csr":
            csr = w.to_sparse_csr()
            return lambda x: (csr @ x.t()).t()
        if name == "torch-bsr":
            if w.shape[0] % BSR_BLOCK or w.shape[1] % BSR_BLOCK:
                return None
            bsr = w.to_sparse_bsr((BSR_BLOCK, BSR_BLOCK))
            return lambda x: (bsr @ x.t()).t()
        if name == "scipy-csr":
            import numpy as np
            import scipy.sparse

            mat = scipy.sparse.csr_matrix(w.numpy())
            return lambda x: torch.from_numpy(np.ascontiguousarray((mat @ x.numpy().T).T))
    except (ImportError, RuntimeError, NotImplementedError):
        return None
    raise ValueError(f"unknown kernel {name!r}")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pick_kernels(modules: dict, tokens: int = 1, repeats: int = PICK_REPEATS, kernels=KERNELS) -> dict:
    """name -> (kernel name, callable): the fastest kernel for each linear's weight at `tokens`
    rows of input (ties and failures fall back to dense)."""
    gen = torch.Generator().manual_seed(0)
    chosen = {}
    with torch.no_grad():
        for name, module in modules.items():
            weight = weight_matrix(module)
            x = torch.randn(tokens, weight.shape[1], generator=gen)
            reference = torch.nn.functional.linear(x, weight.float())
            best = None
            for k in kernels:
                fn = kernel(k, weight)
                if fn is None or not torch.allclose(fn(x), reference, rtol=1e-3, atol=1e-3):
                    continue
                seconds = median_seconds(lambda: fn(x), repeats)
                if best is None or seconds < best[0]:
                    best = (seconds, k, fn)
            chosen[name] = (best[1], best[2])
    return chosen


class KernelLinears:
    """Within the block, each given linear computes through its chosen kernel."""

    def __init__(self, modules: dict, chosen: dict):
        self.modules, self.chosen, self.saved = modules, chosen, {}

    def __enter__(self):
        for name, module in self.modules.items():
            _, fn = self.chosen[name]
            self.saved[name] = module.forward

            def forward(x, fn=fn, bias=module.bias, out=weight_matrix(module).shape[0]):
                y = fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], out)
                return y if bias is None else y + bias

            module.forward = forward
        return self

    def __exit__(self, *exc):
        for name, module in self.modules.items():
            module.forward = self.saved.pop(name)
        return False


def decode_seconds(model, prompt: torch.Tensor, tokens: int, repeats: int) -> float:
    def run():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=model.config.eos_token_id)

    return median_seconds(run, repeats, warmup=1)


def measure(model, *, tokens: int = DECODE_TOKENS, prompt_tokens: int = PROMPT_TOKENS, repeats: int = 3,
            kernels=KERNELS) -> dict:
    """Greedy decoding of `tokens` tokens at batch 1 after a `prompt_tokens` prompt: tokens per
    second on dense kernels and with each linear on its fastest kernel (picked at one token)."""
    model.eval()
    modules = all_prunable(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen)
    dense_s = decode_seconds(model, prompt, tokens, repeats)
    chosen = pick_kernels(modules, tokens=1, kernels=kernels)
    counts: Dict[str, int] = {}
    for k, _ in chosen.values():
        counts[k] = counts.get(k, 0) + 1
    with KernelLinears(modules, chosen):
        best_s = decode_seconds(model, prompt, tokens, repeats)
    return {"tokens": tokens, "prompt_tokens": prompt_tokens, "batch": 1, "repeats": repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dense_tokens_per_s": tokens / dense_s, "best_tokens_per_s": tokens / best_s,
            "speedup": dense_s / best_s, "ms_per_token": 1e3 * best_s / tokens,
            "dense_ms_per_token": 1e3 * dense_s / tokens, "kernels": dict(sorted(counts.items()))}


def random_mask(rows: int, cols: int, kept: int, spec, gen: torch.Generator) -> torch.Tensor:
    """A bool [rows, cols] mask with `kept` kept weights at random positions, in the pattern of
    `spec` (a SparsitySpec; None: dense), drawn by the pattern (Pattern.random_mask)."""
    n = rows * cols
    if spec is None or kept >= n:
        return torch.ones(rows, cols, dtype=torch.bool)
    scores = torch.rand(rows, cols, generator=gen)  # drawn whatever the pattern uses: later linears' masks depend on it
    return pattern_of(spec.pattern).random_mask(spec, kept, scores, gen)


def masks_like(linears: list, seed: int = 0) -> dict:
    """name -> random mask with each LinearCost's kept count and pattern (prunebench.measure.cost)."""
    gen = torch.Generator().manual_seed(seed)
    return {c.name: random_mask(c.rows, c.cols, c.kept, c.spec, gen) for c in linears}
