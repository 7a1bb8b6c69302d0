"""Thanos (Ilin & Richtarik 2025, "Thanos: A Block-wise Pruning Algorithm for Efficient Large
Language Model Compression", arXiv 2504.05346; code github.com/vectozavr/thanos, lib/thanos.py).

SparseGPT's layer-wise loss ||X W^T - X W_hat^T||^2 (Hessian H = X^T X / n, shared by every row),
but each block of columns is pruned at once instead of column by column:
  * the input columns are visited in blocks of `blocksize`, left to right;
  * the weights to remove in the block are chosen by Wanda's score |W_ij| * ||x_j|| (||x_j|| =
    sqrt H_jj), on the weights as updated by the earlier blocks;
  * each row removes all of its chosen weights Q by one multi-weight OBS step over the columns T
    not yet visited (the block and everything right of it): with C = (H_TT)^-1,
    lambda = C_QQ^-1 w_Q and w_T -= C_TQ lambda.  This is the w_T' closest to w_T in the metric
    H_TT with w_Q' = 0 (exactly zero afterwards); visited columns stay frozen.

Defaults and where they come from (lib/thanos.py, Thanos.snap):
  * blocksize 128, v_blocksize 64, percdamp 0.01 of the mean diagonal: snap()'s defaults (their
    main.py at e090a74 passes blocksize=512, v_blocksize=256: set blocksize to compare with it).
  * dead inputs (H_jj = 0: H_jj = 1, W_:j = 0) and dampening as theirs and SparseGPT's, through
    sparsegpt.prepare_hessian / damped_inverse_cholesky (whose retries on failure are ours).
  * selection scope, pinned to commit 68f8a18 ("Try to apply global mask for thanos", kept as
    the default through e090a74, the last change to lib/thanos.py): `selection="remaining"`
    ranks the scores of every not-yet-visited column, marks the layer's still-missing count of
    lowest ones and prunes those that fall in this block; over all the layer's rows (scope
    "layer", theirs) or, with scope "row", per row.  `selection="block"` is commit 02cbfcd: the
    block's own share, chosen inside the block.  Counts follow sparsity.n_to_prune, so the layer
    (or every row) ends exactly at int(target * size).
  * N:M: per row, the Wanda-lowest M - N of every group of M in the block (groups counted from
    column 0; blocks rounded down to a multiple of M), then the same solve.

Where we differ from their code (the result, not only the speed, changes only where noted):
  * (H_TT)^-1: they call torch.linalg.inv(H[i:, i:]) before every block.  With the upper
    Cholesky factor V of H^-1 (H^-1 = V^T V), (H_TT)^-1 = V_TT^T V_TT, and the columns a block
    needs are V[b, T]^T V[b, b]: the same matrix in exact arithmetic at a fraction of the cost.
  * N:M outlier rows (changes the result): their N:M path leaves dense the int(p * rows) + 1 rows
    with the largest sum_j W_ij^2 x_j^2 (p = perc_outliers; one row even at p = 0.0, which their
    main.py passes; prune_thanos' own default is 0.1), so the layer is not N:M.  We prune every
    row.  Their masks are therefore not N:M, and their published 2:4 figures are of such masks;
    prunebench's pattern check would refuse them, so this is not a method option: the pure
    function `outlier_rows` reproduces their choice for side-by-side comparisons
    (benchmarks/parity/thanos.py; their row metric reads only the last calibration batch, ours
    diag H, all tokens).
  * their N:M solve indexes with blocksize // 2, so it is right only for N = M / 2 (2:4, 4:8);
    and their "2:4" prunes 2 of 4 (prunebench's N:M keeps N).
  * v_blocksize only batches the per-row solves (memory); the result does not depend on it.
All arithmetic is float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunebench.errors import UserError
from prunebench.contract import Capabilities, LinearResult, STATS_HESSIAN
from prunebench.engines.layerwise import LayerwisePruner
from prunebench.registry import register
from prunebench.sparsity.patterns import SparsitySpec, _keep_all_but_lowest, n_to_prune, nm_mask

from .sparsegpt import block_keep_mask, factorised_group, split_results

SELECTIONS = ("remaining", "block")


# ---------------------------------------------------------------------------------------------
# Pure functions (no model, no engine): testable on synthetic tensors.

def remaining_prune_mask(scores: torch.Tensor, target: float, cols: int, pruned: torch.Tensor,
                         per_row: bool) -> torch.Tensor:
    """Which of the remaining columns' weights are among the lowest-scoring still to prune.

    scores: [rows, remaining] Wanda scores of the not-yet-visited columns; pruned: [rows] weights
    already pruned in each row.  Marks n_to_prune(rows * cols) - pruned.sum() lowest over the
    whole matrix, or n_to_prune(cols) - pruned[r] lowest in every row r (ties by position).
    """
    rows, rem = scores.shape
    if not per_row:
        k = n_to_prune(rows * cols, target) - int(pruned.sum())
        return ~_keep_all_but_lowest(scores.reshape(1, -1), k).view(rows, rem)
    k = n_to_prune(cols, target) - pruned  # differs by row
    order = torch.argsort(scores, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(rem, device=scores.device).expand(rows, rem))
    return rank < k.unsqueeze(1)


def obs_multipliers(w_block: torch.Tensor, c_block: torch.Tensor, remove: torch.Tensor,
                    v_blocksize: int = 64) -> torch.Tensor:
    """Per row, the multi-weight OBS multipliers lambda = C_QQ^-1 w_Q of its removed set Q.

    w_block: [rows, b] the block's weights; c_block: [b, b] the block's part of (H_TT)^-1;
    remove: bool [rows, b].  Returns [rows, b], zero outside each row's Q, so that
    W[:, T] -= lambda @ C_TB^T is every row's update.  Rows are solved in batches of
    `v_blocksize`, each padded to its largest |Q| with identity rows (which solve to 0).
    """
    rows, b = w_block.shape
    lam = torch.zeros_like(w_block)
    counts = remove.sum(dim=1)
    for r1 in range(0, rows, v_blocksize):
        r2 = min(r1 + v_blocksize, rows)
        kmax = int(counts[r1:r2].max())
        if kmax == 0:
            continue
        # each row's removed columns first, in column order; the padding is its kept columns
        idx = torch.argsort((~remove[r1:r2]).to(torch.int8), dim=1, stable=True)[:, :kmax]
        valid = torch.arange(kmax, device=idx.device) < counts[r1:r2, None]
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(kmax, dtype=c_block.dtype, device=c_block.device)
        r_hat = torch.where(pair, c_block[idx.unsqueeze(2), idx.unsqueeze(1)], eye)
        rhs = torch.where(valid, w_block[r1:r2].gather(1, idx), 0.0)
        lam[r1:r2].scatter_(1, idx, torch.linalg.solve(r_hat, rhs))  # padding solves to 0
    return lam


def thanos_prune(weight: torch.Tensor, hinv_upper: torch.Tensor, input_norm: torch.Tensor, spec: SparsitySpec,
                 blocksize: int = 128, v_blocksize: int = 64, selection: str = "remaining", row_groups=None):
    """Prune `weight` [out, in] block by block. hinv_upper: upper Cholesky factor V of H^-1.

    spec must be resolved (unstructured with scope "layer" or "row", or N:M).  row_groups:
    (start, stop) row ranges that are separate layers sharing this Hessian (q, k, v stacked):
    every row is solved on its own, and each layer's unstructured mask is selected over its
    own rows, exactly as if it were pruned alone.  Returns (new_weight, keep_mask).
    """
    W = weight.to(torch.float32).clone()
    V = hinv_upper.to(torch.float32)
    norm = input_norm.to(torch.float32).to(W.device)
    rows, cols = W.shape
    groups = list(row_groups) if row_groups else [(0, rows)]
    nm = spec.pattern == "nm"
    if nm:
        blocksize = max(spec.m, (blocksize // spec.m) * spec.m)  # N:M groups never straddle blocks
    per_row = spec.scope == "row"
    mask = torch.ones_like(W, dtype=torch.bool)
    pruned = torch.zeros(rows, dtype=torch.long, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        b = i2 - i1
        if nm:
            remove = ~nm_mask(W[:, i1:i2].abs() * norm[i1:i2], spec.n, spec.m)
        elif selection == "block":
            scores = W[:, i1:i2].abs() * norm[i1:i2]
            remove = torch.cat([~block_keep_mask(scores[r1:r2], spec.target, i1, per_row) for r1, r2 in groups])
        else:
            scores = W[:, i1:].abs() * norm[i1:]
            remove = torch.cat([remaining_prune_mask(scores[r1:r2], spec.target, cols, pruned[r1:r2], per_row)
                                for r1, r2 in groups])[:, :b]
        # The block's columns of (H_TT)^-1, T = [i1, cols): V[i1:i2, T]^T V[i1:i2, i1:i2] (V upper).
        vb = V[i1:i2, i1:]
        c = vb.t() @ vb[:, :b]  # [cols - i1, b]
        lam = obs_multipliers(W[:, i1:i2], c[:b], remove, v_blocksize)
        W[:, i1:].addmm_(lam, c.t(), alpha=-1.0)
        W[:, i1:i2].masked_fill_(remove, 0.0)  # exactly zero (the update leaves rounding residue)
        mask[:, i1:i2] = ~remove
        pruned += remove.sum(dim=1)
    return W, mask


def outlier_rows(weight: torch.Tensor, input_sq: torch.Tensor, fraction: float) -> torch.Tensor:
    """The authors' N:M outlier rows: bool [rows], True for the int(fraction * rows) + 1 rows with
    the largest sum_j W_ij^2 * mean x_j^2 (left dense by their code)."""
    rows = weight.shape[0]
    metric = weight.pow(2) @ input_sq.to(weight)
    dense = torch.zeros(rows, dtype=torch.bool, device=weight.device)
    dense[torch.topk(metric, min(rows, int(fraction * rows) + 1)).indices] = True
    return dense


# ---------------------------------------------------------------------------------------------

@register
class Thanos(LayerwisePruner):
    name = "thanos"
    display = "Thanos"
    summary = "block-wise multi-weight OBS removal of Wanda-selected weights (Ilin & Richtarik 2025)"
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=True, statistics=STATS_HESSIAN)
    default_scope = "layer"  # the authors' selection ranks the whole layer's remaining weights
    engine_modules = ("prunebench.methods.sparsegpt",)  # its Hessian preparation decides ours too

    @dataclass
    class Config:
        blocksize: int = 128  # lib/thanos.py snap() default (their main.py passes 512)
        percdamp: float = 0.01  # snap() default: 1% of the mean Hessian diagonal
        v_blocksize: int = 64  # snap() default: rows per batched solve (memory only)
        selection: str = "remaining"  # commit 68f8a18 (to e090a74); "block": commit 02cbfcd
        max_damp_retries: int = 5  # ours: each retry multiplies percdamp by 10, and is reported

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        if (c.blocksize < 1 or c.v_blocksize < 1 or c.percdamp < 0 or c.max_damp_retries < 0
                or c.selection not in SELECTIONS):
            raise UserError("thanos: need blocksize >= 1, v_blocksize >= 1, percdamp >= 0, max_damp_retries >= 0 "
                            f"and selection in {SELECTIONS}, got {c.blocksize}, {c.v_blocksize}, {c.percdamp}, "
                            f"{c.max_damp_retries}, {c.selection!r}")

    def prune_linear(self, weight, stats, spec, ctx):
        return self.prune_group({"weight": weight}, stats, spec, ctx)["weight"]

    def prune_group(self, weights, stats, spec, ctx):
        """Layers that share their input share the Hessian: factorised once, rows solved together,
        each layer's mask selected over its own rows (the same result as one at a time)."""
        cfg = self.config
        if spec.target == 0:
            return {n: LinearResult(mask=torch.ones_like(w, dtype=torch.bool)) for n, w in weights.items()}
        W, hinv, bounds, warnings = factorised_group(self.name, weights, stats, cfg.percdamp, cfg.max_damp_retries)
        new_w, mask = thanos_prune(W, hinv, stats.input_norm.to(W.device), spec, cfg.blocksize, cfg.v_blocksize,
                                   cfg.selection, row_groups=list(bounds.values()))
        return split_results(bounds, new_w, mask, warnings)
