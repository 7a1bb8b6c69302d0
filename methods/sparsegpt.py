"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", arXiv 2301.00774).

Optimal-Brain-Surgeon style pruning of one linear layer: columns (input features) are visited
left to right; when a weight is pruned, the error it causes is pushed onto the not-yet-visited
columns of the same row through the inverse Hessian, so the layer output X W^T is preserved as
well as a second-order model allows.  The Hessian of the layer-wise loss ||X W^T - X W_hat^T||^2
is H = 2 X^T X; every output row shares it, which is what makes the method affordable.

Faithful to the paper and its reference implementation:
  * H comes from the engine as X^T X / n_tokens; the factor 2 and 1/n do not matter because the
    dampening below is relative to the mean diagonal.
  * dead inputs (a zero diagonal entry: the feature never fired) get H_ii = 1 and W[:, i] = 0.
  * dampening: percdamp (1 %) of the mean diagonal is added to the diagonal.
  * only the upper Cholesky factor of H^-1 is used (cholesky -> cholesky_inverse -> upper
    cholesky): its rows are exactly the OBS update vectors in visiting order.
  * lazy batched updates: errors are applied inside a block of `blocksize` (128) columns
    immediately and to the rest of the matrix once per block (a single matmul).
  * adaptive mask selection: for unstructured sparsity, the mask of each block of columns is
    chosen when the block is reached, from the OBS saliency w^2 / d^2 (d = diagonal of the
    Cholesky factor), over all rows of the block.  N:M masks are chosen at the first column of
    each group of M inputs, from the same saliency on the partially updated weights.
All arithmetic is float32 whatever the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunebench.errors import UserError
from prunebench.contract import Capabilities, LinearResult, STATS_HESSIAN
from prunebench.engines.layerwise import LayerwisePruner, stack_rows
from prunebench.registry import register
from prunebench.sparsity.patterns import SparsitySpec, _keep_all_but_lowest, n_to_prune, nm_mask


SUB_BLOCK = 32  # columns per inner OBS sub-block (speed only; the result is the same for any value)


class CholeskyError(RuntimeError):
    """The layer's Hessian could not be factorised, even after raising the dampening."""


# ---------------------------------------------------------------------------------------------
# Pure functions (no model, no engine): testable on synthetic tensors.

def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor):
    """float32 copies of H and W with dead inputs handled as in the paper.

    Returns (H, W, dead) where `dead` is the bool [in] vector of inputs with H_ii == 0.
    Rejects what no dampening can repair (non-finite entries, negative diagonal).
    """
    H = hessian.detach().to(torch.float32).clone()
    W = weight.detach().to(torch.float32).clone()
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]:
        raise ValueError(f"hessian {tuple(H.shape)} does not match weight {tuple(W.shape)} ([out, in] -> [in, in])")
    if not torch.isfinite(H).all():
        raise CholeskyError("the Hessian X^T X contains NaN or inf: the calibration activations overflowed "
                            "(no dampening can repair that; check the model dtype and calibration data)")
    diag = torch.diagonal(H)
    if (diag < 0).any():
        raise CholeskyError(f"the Hessian has {int((diag < 0).sum())} negative diagonal entries, so it is not a "
                            "Gram matrix X^T X (corrupted statistics?)")
    dead = diag == 0
    if dead.any():
        # The feature is always zero on the calibration data: its weights cannot influence the
        # output, so they are zeroed and H_ii = 1 keeps the matrix invertible (as the authors'
        # reference implementation does).
        idx = dead.nonzero().squeeze(1)
        H[idx, idx] = 1.0
        W[:, dead] = 0.0
    return H, W, dead


def _upper_cholesky_of_inverse(Hd: torch.Tensor):
    """Upper Cholesky factor of Hd^-1, or None if any step fails or produces non-finite values."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0 or not torch.isfinite(L).all():
        return None
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0 or not torch.isfinite(U).all():
        return None
    return U


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_retries: int = 5,
                            growth: float = 10.0):
    """Upper Cholesky factor of (H + percdamp * mean(diag H) * I)^-1, retrying with more dampening.

    Float32 Cholesky can fail on a nearly singular H (few tokens, collinear features, outliers).
    Each retry multiplies percdamp by `growth`; every retry is reported, never silent.
    Returns (U, percdamp_used, warnings); raises CholeskyError when every attempt failed.
    """
    mean_diag = float(torch.diagonal(H).mean())
    if not (mean_diag > 0):
        raise CholeskyError(f"the Hessian's mean diagonal is {mean_diag:g}; dampening relative to it cannot help")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    warnings = []
    tried = []
    pd = float(percdamp)
    for attempt in range(max_retries + 1):
        U = _upper_cholesky_of_inverse(H + (pd * mean_diag) * eye)
        if U is not None:
            return U, pd, warnings
        tried.append(pd)
        if attempt < max_retries:
            nxt = pd * growth if pd > 0 else 0.01  # from 0, restart at the paper's 1%
            warnings.append(f"sparsegpt: Cholesky failed with percdamp={pd:g} (dampening {pd * mean_diag:.4g}); "
                            f"retrying with percdamp={nxt:g} (dampening {nxt * mean_diag:.4g})")
            pd = nxt
    raise CholeskyError("sparsegpt: Cholesky of the damped Hessian failed for percdamp in "
                        f"{', '.join(f'{p:g}' for p in tried)} (mean diagonal {mean_diag:.4g}); the Hessian is "
                        "not positive definite. Check the calibration activations, or raise percdamp / "
                        "max_damp_retries")


def _share(fraction: float, start: int, stop: int) -> int:
    """Items to prune among positions [start, stop) so the running total stays n_to_prune(stop)."""
    return n_to_prune(stop, fraction) - n_to_prune(start, fraction)


def block_keep_mask(saliency: torch.Tensor, target: float, col_start: int, per_row: bool) -> torch.Tensor:
    """Keep-mask of one block of columns: prune the lowest-saliency `target` fraction.

    The count carries its truncation from block to block, so the whole matrix ends with exactly
    int(target * numel) pruned (scope "layer"), or int(target * in) in every row (scope "row"):
    prunebench's one counting convention (sparsity.n_to_prune).  The reference selects
    `saliency <= sorted[int(target * block_numel)]` in every block, which prunes one weight
    more per block (and every tie); ties here are broken by position (stable sort).
    """
    rows, count = saliency.shape
    if per_row:
        return _keep_all_but_lowest(saliency, _share(target, col_start, col_start + count))
    k = _share(target, rows * col_start, rows * (col_start + count))
    return _keep_all_but_lowest(saliency.reshape(1, -1), k).view(rows, count)


def sparsegpt_prune(weight: torch.Tensor, hinv_upper: torch.Tensor, spec: SparsitySpec, blocksize: int = 128,
                    row_groups=None):
    """Prune `weight` [out, in] with OBS updates. `hinv_upper`: upper Cholesky factor of H^-1.

    spec must be resolved: unstructured with scope "layer" (the paper's per-block selection over
    all rows) or "row" (the same per-block selection, but an equal share of every row), or N:M.
    row_groups: (start, stop) row ranges that are separate layers sharing this Hessian (q, k and
    v stacked): the OBS updates are row by row, so stacking changes nothing but the cost, and
    each layer's mask is selected over its own rows, exactly as if it were pruned alone.
    Returns (new_weight, keep_mask), new_weight exactly zero where the mask is False.
    """
    W = weight.to(torch.float32).clone()
    Hinv = hinv_upper.to(torch.float32)
    rows, cols = W.shape
    groups = list(row_groups) if row_groups else [(0, rows)]
    mask = torch.ones_like(W, dtype=torch.bool)
    nm = spec.pattern == "nm"
    if nm:
        # The N:M groups are counted from column 0 of the matrix. The reference picks a group's
        # mask at the group's first column relative to its 128-wide block, which is only the same
        # thing when M divides the block size; round the block down to a multiple of M so a
        # group never straddles two blocks for any N:M (e.g. 1:3 uses blocks of 126).
        blocksize = max(spec.m, (blocksize // spec.m) * spec.m)
    per_row = spec.scope == "row"

    # Within a block the OBS loop runs on the transposed block (a column is a contiguous row) in
    # sub-blocks: each column's error updates only the rest of its sub-block at once, and the
    # sub-block's errors reach the rest of the block in one matmul.  The same arithmetic as the
    # reference's column-by-column update of the whole block, in far fewer memory passes.  N:M
    # groups never straddle a sub-block (its width is a multiple of M).
    sub = spec.m * max(1, SUB_BLOCK // spec.m) if nm else SUB_BLOCK
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        Wt = W[:, i1:i2].t().contiguous()  # [count, rows]
        Errt = torch.empty_like(Wt)  # every row is written by its column's step
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)

        if nm:
            keep_t = torch.ones_like(Wt, dtype=torch.bool)
        else:
            # Adaptive selection: decided now, from weights already updated by earlier blocks.
            saliency = Wt.t().pow(2) / d.pow(2)
            keep_t = torch.cat([block_keep_mask(saliency[a:b], spec.target, i1, per_row) for a, b in groups]).t().contiguous()
        prune_t = (~keep_t).to(Wt.dtype)

        for s1 in range(0, count, sub):
            s2 = min(s1 + sub, count)
            for i in range(s1, s2):
                if nm and i % spec.m == 0:
                    g = min(spec.m, count - i)  # shorter only for the matrix's trailing group
                    sal = Wt[i:i + g].t().pow(2) / d[i:i + g].pow(2)
                    group_keep = nm_mask(sal, spec.n, spec.m).t()
                    keep_t[i:i + g] = group_keep
                    prune_t[i:i + g] = (~group_keep).to(Wt.dtype)
                # The error of pruning column i (its pruned part over the OBS pivot) is pushed
                # onto the later columns through row i of the Cholesky factor.
                err = torch.mul(Wt[i], prune_t[i], out=Errt[i]).div_(d[i])  # in place: no temporaries
                if i + 1 < s2:
                    Wt[i + 1:s2].addr_(Hinv1[i, i + 1:s2], err, alpha=-1.0)
            if s2 < count:
                Wt[s2:].addmm_(Hinv1[s1:s2, s2:].t(), Errt[s1:s2], alpha=-1.0)

        W[:, i1:i2] = (Wt * keep_t).t()  # kept weights as updated; pruned ones exactly zero
        mask[:, i1:i2] = keep_t.t()
        # Lazy update: the whole block's errors reach the later columns in one matmul.
        W[:, i2:].addmm_(Errt.t(), Hinv[i1:i2, i2:], alpha=-1.0)
    return W, mask


def factorised_group(method: str, weights: dict, stats, percdamp: float, max_retries: int):
    """What the OBS-style methods share for linears that read the same input (q/k/v, gate/up):
    their rows stacked in float32 with dead inputs zeroed, the upper Cholesky factor of the damped
    H^-1 (factorised once for the group), each linear's row range, and the dampening retries'
    warnings under the method's name."""
    if stats is None or stats.hessian is None:
        raise ValueError(f"{method} needs the Hessian X^T X of the layer inputs (statistics='hessian')")
    stacked, bounds = stack_rows(weights)
    H, W, _dead = prepare_hessian(stats.hessian.to(stacked.device), stacked)
    hinv, _pd, warnings = damped_inverse_cholesky(H, percdamp, max_retries)
    return W, hinv, bounds, [w.replace("sparsegpt:", f"{method}:", 1) for w in warnings]


def split_results(bounds: dict, new_weight: torch.Tensor, mask: torch.Tensor, warnings: list) -> dict:
    """Each linear's LinearResult from the stacked answer (the group's warnings go with the first)."""
    return {n: LinearResult(mask=mask[a:b], weight=new_weight[a:b], warnings=list(warnings) if i == 0 else [])
            for i, (n, (a, b)) in enumerate(bounds.items())}


# ---------------------------------------------------------------------------------------------

@register
class SparseGPT(LayerwisePruner):
    name = "sparsegpt"
    display = "SparseGPT"
    summary = "OBS pruning with lazy blocked weight updates from the inverse Hessian (Frantar & Alistarh 2023)"
    cost_ratio = 1.65  # prune time over floor-1: results/benchmarks/layerwise_methods.json
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=True, statistics=STATS_HESSIAN)
    # The paper's adaptive selection compares weights across all rows of a block of columns;
    # "row" gives every row the same share instead (the Wanda protocol).
    default_scope = "layer"

    @dataclass
    class Config:
        blocksize: int = 128  # paper and reference code: lazy-update block of 128 columns
        percdamp: float = 0.01  # paper: 1% of the mean Hessian diagonal
        max_damp_retries: int = 5  # ours: each retry multiplies percdamp by 10, and is reported

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.blocksize < 1 or cfg.percdamp < 0 or cfg.max_damp_retries < 0:
            raise UserError("sparsegpt: need blocksize >= 1, percdamp >= 0 and max_damp_retries >= 0, got "
                            f"{cfg.blocksize}, {cfg.percdamp}, {cfg.max_damp_retries}")

    def prune_linear(self, weight, stats, spec, ctx):
        return self.prune_group({"weight": weight}, stats, spec, ctx)["weight"]

    def prune_group(self, weights, stats, spec, ctx):
        """Layers that share their input (q/k/v, gate/up) share the Hessian: it is prepared and
        factorised once and their rows are solved together (each layer's mask still selected
        over its own rows), the same result as one at a time at a fraction of the cost."""
        cfg = self.config
        if spec.target == 0:
            return {n: LinearResult(mask=torch.ones_like(w, dtype=torch.bool)) for n, w in weights.items()}
        W, hinv, bounds, warnings = factorised_group(self.name, weights, stats, cfg.percdamp, cfg.max_damp_retries)
        new_w, mask = sparsegpt_prune(W, hinv, spec, cfg.blocksize, row_groups=list(bounds.values()))
        return split_results(bounds, new_w, mask, warnings)
