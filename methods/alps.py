"""ALPS (Meng, Behdin, Wang & Mazumder, NeurIPS 2024, "ALPS: Improved Optimization for Highly
Sparse One-Shot Pruning for Large Language Models", arXiv 2406.07831; reference code
github.com/mazumder-lab/ALPS, alps.py, class ALPS_prune, method ALPS_admm).

Layer-wise reconstruction with an l0 constraint,  min ||X W^T - X B^T||^2  s.t.  B has the
sparsity pattern, split as B (least squares) = D (sparse) and solved with ADMM whose penalty rho
grows with how much the support still moves; then the weights on the final support are refined
with conjugate gradients.  In the reference code's terms (rows here: prunebench's [out, in]):

  1. H = X^T X (+ ridge 0.01 x mean diag H), normalised to a unit diagonal: H_n = H / (n n^T),
     n_j = sqrt(H_jj) + 1e-8, W_n = W * n (so |W_n| is a Wanda score).  The reconstruction target
     X_n^T Y with Y = X W^T is W_n H_n: the ridge is on both sides, i.e. the objective in the
     original coordinates is (B - W) (H + ridge I) (B - W)^T, a ridge towards the dense weights.
  2. One eigendecomposition H_n = Q diag(L) Q^T gives (H_n + rho I)^-1 = Q diag(1/(L + rho)) Q^T
     for every rho without refactorising.
  3. ADMM from B = W_n, V = 0, D = top-k of |W_n|:
        B <- (W_n H_n - V + rho D) (H_n + rho I)^-1
        D <- top-k of |B + V / rho|   (over the matrix, per row, or per group of M for N:M)
        V <- V + rho (B - D)
  4. Every 3 iterations, s = |supp D_t  xor  supp D_{t-3}| / k (k = number of weights kept):
     rho x 1.3 if s > 0.1, x 1.2 if s > 0.005, else x 1.1, capped at 1e6; after 30 iterations
     stop at the first check with s < 3e-4; at most 300 iterations.
  5. Support = top-k of |B| (the primal iterate, as the code does), then conjugate gradients on
     that fixed support, from B, 10 iterations, rtol 1e-4, all rows at once; de-normalised.

Defaults and their sources (the reference code's ALPS_admm / cg_batch defaults, as opt.py and
llama.py call it: rho=0.1, the sparsity or N:M, nothing else): ridge 0.01 x mean diagonal, rho 0.1,
update_iter 3, switch_iter 30, max_iter 300, s thresholds 0.1 / 0.005 / 3e-4 and factors 1.3 /
1.2 / 1.1, rho cap 1e6, CG rtol 1e-4 and 10 iterations.  Selection: one top-k over the whole
matrix for unstructured sparsity (prunebench scope "layer"); "0.5@row" selects per row.

Where we differ from the reference code, on purpose (the first two are options, for comparisons
with published numbers):
  * rho rule (`authors_rho_rule`): beyond the rule above, the code has two unstated branches:
    while rho has never grown, a small support change (< 0.5 % of k) divides rho by 5 and
    restarts ADMM from the dense weights, and no change at all divides it by 5; once rho has
    grown, a check with no change stops immediately, even before iteration 30.  We follow the
    stated schedule; `authors_rho_rule=True` adds both branches.
  * CG stopping (`authors_cg_stop`): the code compares the unmasked residual A X - B, which does
    not vanish at the masked optimum, and takes its norms per input feature across outputs
    (dim=1 of its [in, out] layout) instead of per output system, so in practice it always
    runs the 10 iterations.  We stop when every row's residual on its support is below rtol x
    the norm of that row's right-hand side on its support.
  * the CG "preconditioner" is Jacobi (1 / diag A); on the unit-diagonal H_n that is the
    identity the code uses, so this changes nothing there.
  * the support change counts mask flips (the code counts entries of D equal to 0, which would
    also count a kept weight that happens to be exactly 0).  Counting is prunebench's
    (int(target x count) pruned, ties by position) instead of round((1 - s) x count) kept.
  * the code also evaluates the objective at every check for a commented-out print; we skip it.
Layers that share their input (q/k/v) share one normalisation and one eigendecomposition; each
still runs its own ADMM loop and rho schedule, so the result is the same as pruning it alone.
Arithmetic is float32, except the one eigendecomposition, in float64 as in the code (which also
forms each (H_n + rho I)^-1 in float64 before casting it; we form it in float32).
benchmarks/parity/alps.py runs this and the authors' code on SmolLM2 layers: masks as close as
rounding noise allows, reconstruction errors within 0.03 %, the same iteration counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunebench.errors import UserError
from prunebench.contract import Capabilities, LinearResult, STATS_HESSIAN
from prunebench.engines.layerwise import LayerwisePruner, stack_rows
from prunebench.registry import register
from prunebench.sparsity.patterns import SparsitySpec

from .admm import normalise_inputs, select_mask
from .sparsegpt import CholeskyError

# Reference code: (s threshold, rho factor), checked in order; below both, x RHO_SLOW.
RHO_STEPS = ((0.1, 1.3), (0.005, 1.2))
RHO_SLOW = 1.1
AUTHORS_RHO_SHRINK = 5.0  # reference code's unstated branches (authors_rho_rule)


# ---------------------------------------------------------------------------------------------
# Pure functions (no model, no engine): testable on synthetic tensors.

def eigen_factor(H: torch.Tensor):
    """(Q float32 [in, in], L float64 [in]) with H = Q diag(L) Q^T; eigh in float64 (the code's)."""
    L, Q = torch.linalg.eigh(H.to(torch.float64))
    return Q.to(torch.float32), L


def ridge_inverse(Q: torch.Tensor, L: torch.Tensor, rho: float) -> torch.Tensor:
    """(H + rho I)^-1 = Q diag(1 / (L + rho)) Q^T, float32, for any rho > -min(L)."""
    scale = (1.0 / (L + rho)).to(Q.dtype)
    return (Q * scale.unsqueeze(0)) @ Q.T


def ridge_solve(Q: torch.Tensor, L: torch.Tensor, rhs: torch.Tensor, rho: float) -> torch.Tensor:
    """X with X (H + rho I) = rhs, rows of rhs [*, in] (H symmetric): one product each way."""
    scale = (1.0 / (L + rho)).to(Q.dtype)
    return ((rhs @ Q) * scale.unsqueeze(0)) @ Q.T


@dataclass
class RhoSchedule:
    """The adaptive penalty: call `check` after every `update_every`-th ADMM iteration.

    `check(iteration, change, kept)` (iteration counted from 1, change = support flips since the
    previous check) updates `rho` and returns (restart, stop): restart only under the authors'
    rule (start again from the dense weights with the new rho), stop when the loop should end.
    """

    rho: float = 0.1
    min_iterations: int = 30
    stop_change: float = 3e-4
    rho_max: float = 1e6
    authors_rho_rule: bool = False
    increased: bool = False  # whether rho has grown yet (the authors' rule needs it)

    def check(self, iteration: int, change: int, kept: int) -> tuple:
        s = change / max(kept, 1)
        restart = False
        for threshold, factor in RHO_STEPS:
            if s > threshold:
                self.rho *= factor
                self.increased = True
                break
        else:
            if not self.authors_rho_rule:
                self.rho *= RHO_SLOW
            elif change > 0:
                if self.increased:
                    self.rho *= RHO_SLOW
                else:  # rho too large from the start: shrink it and begin again
                    self.rho /= AUTHORS_RHO_SHRINK
                    restart = True
            elif self.increased:
                return False, True  # no change at all: the code stops, whatever the iteration
            else:
                self.rho /= AUTHORS_RHO_SHRINK
        self.rho = min(self.rho, self.rho_max)
        # The code's `i_admm >= switch_iter` with i_admm counted from 0: more than 30 done.
        return restart, iteration > self.min_iterations and s < self.stop_change


def alps_admm(Q: torch.Tensor, L: torch.Tensor, Wn: torch.Tensor, target: torch.Tensor, spec: SparsitySpec, *,
              rho: float = 0.1, max_iterations: int = 300, update_every: int = 3, min_iterations: int = 30,
              stop_change: float = 3e-4, rho_max: float = 1e6, authors_rho_rule: bool = False):
    """The ADMM phase for one matrix in normalised coordinates.

    Wn: [out, in] normalised dense weights; target = Wn @ Hn (X_n^T Y as rows); (Q, L) the
    eigendecomposition of the normalised Hessian Hn.  Returns (B, mask, info): B the primal
    iterate projected on its own top-k (the support the CG phase refines), mask that support,
    info {iterations, rho, history: [(iteration, change, rho after the check)]}.
    """
    def project(scores):
        return select_mask(scores, spec, spec.target)

    schedule = RhoSchedule(rho, min_iterations, stop_change, rho_max, authors_rho_rule)
    mask = project(Wn.abs())
    kept = int(mask.sum())
    D0 = torch.where(mask, Wn, torch.zeros_like(Wn))
    B, D, V = Wn.clone(), D0.clone(), torch.zeros_like(Wn)
    previous = mask
    Ainv = ridge_inverse(Q, L, schedule.rho)
    history = []
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        r = schedule.rho
        B = (target - V + r * D) @ Ainv
        Z = B + V / r
        mask = project(Z.abs())
        D = torch.where(mask, Z, torch.zeros_like(Z))
        V += r * (B - D)
        if iteration % update_every:
            continue
        change = int((mask != previous).sum())
        previous = mask
        restart, stop = schedule.check(iteration, change, kept)
        history.append((iteration, change, schedule.rho))
        if restart:
            B, D, V = Wn.clone(), D0.clone(), torch.zeros_like(Wn)
        if stop:
            break
        Ainv = ridge_inverse(Q, L, schedule.rho)
    mask = project(B.abs())
    B = torch.where(mask, B, torch.zeros_like(B))
    return B, mask, {"iterations": iteration, "rho": schedule.rho, "history": history}


def masked_pcg(A: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor, X0: torch.Tensor | None = None, *,
               rtol: float = 1e-4, max_iterations: int = 10, authors_stop: bool = False):
    """Rows x of X [out, in] with (x A)[S] = rhs[S] and x = 0 off S (S = that row's mask):
    the masked least-squares optimum of (x - w) A (x - w)^T when rhs = W A.  A symmetric
    positive (semi)definite [in, in].  Preconditioned CG for all rows at once (Jacobi,
    1 / diag A), from X0 restricted to the mask.  Stops when every row's residual on its support
    is <= rtol x its right-hand side's norm on the support (authors_stop: the reference code's
    test, see the module docstring).  Returns (X, iterations run)."""
    maskf = mask.to(A.dtype)
    X = torch.zeros_like(rhs) if X0 is None else X0 * maskf
    if max_iterations <= 0:
        return X, 0
    R = (rhs - X @ A) * maskf
    d = torch.diagonal(A)
    Minv = torch.where(d > 0, 1.0 / d, torch.ones_like(d)).unsqueeze(0)
    Zk = R * Minv
    P = Zk
    rz = (R * Zk).sum(dim=1)
    bound = rtol * (rhs * maskf).norm(dim=1)
    if authors_stop:
        col_bound = rtol * rhs.norm(dim=0)
    k = 0
    for k in range(1, max_iterations + 1):
        AP = P @ A
        pAp = (P * AP).sum(dim=1)
        alpha = torch.where(pAp > 0, rz / torch.where(pAp > 0, pAp, 1.0), torch.zeros_like(pAp)).unsqueeze(1)
        X = X + alpha * P
        R = (R - alpha * AP) * maskf
        if authors_stop:
            done = bool(((X @ A - rhs).norm(dim=0) <= col_bound).all())
        else:
            done = bool((R.norm(dim=1) <= bound).all())
        if done:
            break
        Zk = R * Minv
        rz_next = (R * Zk).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / torch.where(rz > 0, rz, 1.0), torch.zeros_like(rz)).unsqueeze(1)
        P = Zk + beta * P
        rz = rz_next
    return X, k


def alps_prune(hessian: torch.Tensor, weight: torch.Tensor, spec: SparsitySpec, *, percdamp: float = 0.01,
               rho: float = 0.1, max_iterations: int = 300, update_every: int = 3, min_iterations: int = 30,
               stop_change: float = 3e-4, rho_max: float = 1e6, cg_iterations: int = 10, cg_rtol: float = 1e-4,
               authors_rho_rule: bool = False, authors_cg_stop: bool = False, row_groups=None):
    """ALPS on one [out, in] weight (or several stacked that share `hessian`, split by
    `row_groups` (start, stop) row ranges, each solved on its own).  Returns (new_weight,
    keep_mask, infos): float32, exact zeros off the mask; infos one dict per group with the
    ADMM iterations, final rho, check history and CG iterations."""
    H = hessian.detach().to(torch.float32)
    if not torch.isfinite(H).all():
        raise CholeskyError("alps: the Hessian X^T X contains NaN or inf: the calibration activations overflowed")
    ridge = float(percdamp) * float(torch.diagonal(H).mean())
    Hd = H + ridge * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    del H
    Hn, Wn, norm = normalise_inputs(Hd, weight)
    del Hd
    Q, L = eigen_factor(Hn)
    target = Wn @ Hn
    new_w = torch.zeros_like(Wn)
    mask = torch.zeros_like(Wn, dtype=torch.bool)
    infos = []
    for a, b in (list(row_groups) if row_groups else [(0, Wn.shape[0])]):
        B, m, info = alps_admm(Q, L, Wn[a:b], target[a:b], spec, rho=rho, max_iterations=max_iterations,
                               update_every=update_every, min_iterations=min_iterations, stop_change=stop_change,
                               rho_max=rho_max, authors_rho_rule=authors_rho_rule)
        X, info["cg_iterations"] = masked_pcg(Hn, target[a:b], m, B, rtol=cg_rtol, max_iterations=cg_iterations,
                                              authors_stop=authors_cg_stop)
        new_w[a:b] = torch.where(m, X / norm.unsqueeze(0), torch.zeros_like(X))
        mask[a:b] = m
        infos.append(info)
    return new_w, mask, infos


# ---------------------------------------------------------------------------------------------

@register
class ALPS(LayerwisePruner):
    name = "alps"
    display = "ALPS"
    summary = "ADMM with an adaptive penalty for the support, then CG on it (Meng et al. 2024)"
    capabilities = Capabilities(patterns=("unstructured", "nm"), needs_calibration=True, statistics=STATS_HESSIAN)
    engine_modules = ("prunebench.methods.admm", "prunebench.methods.sparsegpt")  # imported: part of its identity
    default_scope = "layer"  # reference code: one top-k over the whole matrix

    @dataclass
    class Config:
        percdamp: float = 0.01  # code: ridge 0.01 x mean diagonal of X^T X, before normalising
        rho: float = 0.1  # code: initial ADMM penalty (H normalised to a unit diagonal)
        max_iterations: int = 300  # code: max_iter
        update_every: int = 3  # code: update_iter, rho updated every 3 iterations
        min_iterations: int = 30  # code: switch_iter, no support-based stop before it
        stop_change: float = 3e-4  # code: stop when support change / k < 3e-4
        rho_max: float = 1e6  # code: rho cap
        cg_iterations: int = 10  # code: cg_batch maxiter
        cg_rtol: float = 1e-4  # code: cg_batch rtol
        authors_rho_rule: bool = False  # the code's unstated rho branches (module docstring)
        authors_cg_stop: bool = False  # the code's CG stopping test (module docstring)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        if not (c.percdamp >= 0 and c.rho > 0 and c.rho_max >= c.rho and c.max_iterations >= 1
                and c.update_every >= 1 and c.min_iterations >= 0 and c.stop_change >= 0
                and c.cg_iterations >= 0 and c.cg_rtol >= 0):
            raise UserError("alps: need percdamp >= 0, 0 < rho <= rho_max, max_iterations >= 1, update_every >= 1, "
                            "min_iterations, stop_change, cg_iterations, cg_rtol >= 0; got "
                            f"percdamp={c.percdamp}, rho={c.rho}, rho_max={c.rho_max}, max_iterations="
                            f"{c.max_iterations}, update_every={c.update_every}, min_iterations={c.min_iterations}, "
                            f"stop_change={c.stop_change}, cg_iterations={c.cg_iterations}, cg_rtol={c.cg_rtol}")

    def prune_linear(self, weight, stats, spec, ctx):
        return self.prune_group({"weight": weight}, stats, spec, ctx)["weight"]

    def prune_group(self, weights, stats, spec, ctx):
        """Layers that share their input (q/k/v, gate/up): one normalisation and one
        eigendecomposition, then each layer's own ADMM and CG (the same result as one at a time)."""
        if stats is None or stats.hessian is None:
            raise ValueError("alps needs the Hessian X^T X of the layer inputs (statistics='hessian')")
        if spec.target == 0:
            return {n: LinearResult(mask=torch.ones_like(w, dtype=torch.bool)) for n, w in weights.items()}
        c = self.config
        stacked, bounds = stack_rows(weights)
        new_w, mask, _ = alps_prune(stats.hessian.to(stacked.device), stacked, spec, percdamp=c.percdamp, rho=c.rho,
                                    max_iterations=c.max_iterations, update_every=c.update_every,
                                    min_iterations=c.min_iterations, stop_change=c.stop_change, rho_max=c.rho_max,
                                    cg_iterations=c.cg_iterations, cg_rtol=c.cg_rtol,
                                    authors_rho_rule=c.authors_rho_rule, authors_cg_stop=c.authors_cg_stop,
                                    row_groups=list(bounds.values()))
        return {n: LinearResult(mask=mask[a:b], weight=new_w[a:b]) for n, (a, b) in bounds.items()}
