"""ProxSparse (Liu et al., ICML 2025, "ProxSparse: Regularized Learning of Semi-Structured Sparsity
Masks for Pretrained LLMs", arXiv 2502.00258; code amazon-science/ProxSparse, end-to-end/).

Weights frozen.  The method trains a relaxed copy W' of every decoder linear (initialised to the
frozen W) on the language-model loss, and after every optimizer step applies the proximal operator
of a semi-structured regulariser to each group of 4 consecutive inputs of a row:

    R(w) = sum over the 4 triples i<j<k of |w_i w_j w_k|      (zero iff at most 2 non-zeros)
    prox(z) = argmin_w 1/2 ||w - z||^2 + lambda_1 R(w)

with lambda_1 per step, not scaled by the lr (the authors' trainer calls its operator with
lambda_1 itself after every optimizer.step()).  The operator is solved the authors' way ("Enum
ALM"): on |z| sorted in decreasing order, three candidates -- the 2-sparse one (keep the two
largest: R = 0), the 3-sparse one and the dense one, each by alternating (coordinate) minimisation
from w = 0, the smallest coordinate first, w_i = max(|z|_i - lambda_1 * e2(other w), 0), up to
100 sweeps or until the summed change over the layer is below 1e-8 -- and the candidate with the
lowest objective wins (ties: the sparser); signs and order are then restored.  Optional frozen-
weight regulariser (their `--project_lambda2 1` scripts), added to the loss:

    lambda_2 * sum over layers || W' * (W' - W) / (|W| + epsilon) ||_F^2

(their W' / (W + epsilon * sign(W)) with sign(0) = +1, squared: the same value).  At the end each
group keeps the 2 largest |W'| (ties: the larger frozen |W|) and the mask is applied to the frozen
weights: no weight update.  Optimizer: the authors' Hugging Face trainer, AdamW lr 1e-4 (5e-5 for
LLaMA-3.1 / Mistral), betas (0.9, 0.999), no weight decay, 10% warm-up, clipping 1.0, batch 1,
one epoch over 400 C4 samples of up to 4096 tokens, bf16.

The regulariser and its operator are defined for 2:4 only: any other pattern is refused.

What the engine cannot do as the authors' code does (written into every record, AUTHORS_CODE):
their learning rate decays linearly after the warm-up, here a cosine to zero; their trainer also
trains every other parameter (embeddings, norms, head: discarded at the end, since the mask is
applied to the original model) while here only the relaxed linears learn; their samples are whole
C4 documents truncated at the context length (most are shorter), here windows of exactly seqlen.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from prunebench.errors import UserError
from prunebench.engines.masklearn import LearnedMaskPruner
from prunebench.engines.masklearn_config import MaskTrainingConfig, lr_factor
from prunebench.modeling.models import weight_matrix
from prunebench.contract import Capabilities
from prunebench.registry import register
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.engines.concrete import _LDFLAGS, _cflags
from prunebench.engines.kernel_build import optional_extension

GROUP = 4  # the regulariser is the 2:4 one: groups of 4, at most 2 non-zeros
KEEP = 2

# The authors' trainer and scripts (script/learn_mask_*.sh, end-to-end/main.py, Hugging Face
# TrainingArguments defaults): AdamW betas (0.9, 0.999), weight decay 0, warmup_ratio 0.1,
# max_grad_norm 1.0, batch 1 x 400 samples x 1 epoch = 400 steps, bf16 weights.
_AUTHORS = dict(steps=400, batch_size=1, seqlen=4096, grad_accum=1, streaming=True, dataset="c4", beta2=0.999,
                weight_decay=0.0, warmup_steps=40, lr_schedule="cosine", lr_final_ratio=0.0, grad_clip=1.0,
                init_std=None, prior_strength=None, prior_method=None, logits_dtype="bfloat16",
                gradient_checkpointing=True, checkpoint_every=50, heldout_windows=16, heldout_every=100,
                prox_iters=100, prox_tol=1e-8)
PRESETS = {
    # script/learn_mask_llama2_7b_prox.sh (LLaMA-2-7B: the Llama family of SmolLM2, and the model of
    # MaskLLM's paper preset): lambda_1 0.25, lr 1e-4, ctx 4096, 400 samples, lambda_2 off.
    "paper": dict(_AUTHORS, lr=1e-4, lambda1=0.25, lambda2=0.0, epsilon=0.1),
    # script/learn_mask_llama3.1_8b_full.sh: both regularisers (lambda_2 1.0, epsilon 0.1),
    # lambda_1 0.85, lr 5e-5.
    "paper-llama31-full": dict(_AUTHORS, lr=5e-5, lambda1=0.85, lambda2=1.0, epsilon=0.1),
    # SmolLM2-135M on a 2-core CPU at MaskLLM's embedded budget (72 steps x 2 x 256 tokens of the
    # cell's calibration text), so the two compare at equal tokens; 10% warm-up as the authors.
    # The relaxed copy in float32 (a CPU has no fast bf16).  LLaMA-2-7B's lambda_1 and lr carried
    # to SmolLM2's weight scale: its linears have RMS 0.19 (measured), LLaMA-2-7B's about 0.02,
    # s ~ 10; prox_lambda(s z) = s prox_{lambda s}(z) (tested) and Adam's steps are absolute, so
    # lambda_1 / 10 and lr x 10 give the authors' per-step dynamics in SmolLM2's units (their
    # 0.25 would make the proximal shrinkage ~100x the gradient steps here).  Derived, not tuned.
    # Cost: the proximal step over all 210 linears took ~35 s per step on one core as torch ops
    # (prox_2to4_torch); the C++ operator 12.6 s against the torch ops' 61.0 s in one run on one
    # thread of a loaded, shared machine (measured): about 5x less.
    "embedded": dict(steps=72, batch_size=2, seqlen=256, grad_accum=1, lr=1e-3, beta2=0.999, weight_decay=0.0,
                     warmup_steps=7, lr_schedule="cosine", lr_final_ratio=0.0, grad_clip=1.0, init_std=None,
                     prior_strength=None, prior_method=None, lambda1=0.025, lambda2=0.0, epsilon=0.1,
                     logits_dtype="float32", gradient_checkpointing=False, checkpoint_every=20, heldout_windows=4,
                     heldout_every=12, prox_iters=100, prox_tol=1e-8),
    # A few steps on tiny random models, for unit and conformance tests (both regularisers on).
    "tiny": dict(steps=6, batch_size=2, seqlen=32, grad_accum=1, lr=1e-3, beta2=0.999, weight_decay=0.0,
                 warmup_steps=1, lr_schedule="cosine", lr_final_ratio=0.0, grad_clip=1.0, init_std=None,
                 prior_strength=None, prior_method=None, lambda1=1.0, lambda2=0.1, epsilon=0.1,
                 logits_dtype="float32", gradient_checkpointing=False, checkpoint_every=0, heldout_windows=2,
                 heldout_every=0, prox_iters=100, prox_tol=1e-8),
}

# What differs from the authors' code whatever the preset (the engine's choices), in every record.
AUTHORS_CODE = {
    "lr_schedule": "authors: linear decay to 0 after the warm-up (Hugging Face default); here cosine to 0",
    "trained_parameters": "authors: every parameter trains (embeddings, norms, head; discarded at the end); "
                          "here only the relaxed copies of the pruned linears",
    "samples": "authors: whole C4 documents truncated at ctx_len (most shorter), batch 1; here windows of exactly seqlen",
    "prox_precision": "authors: the operator in the weights' dtype (bf16); here in float32, cast back",
}


# ---------------------------------------------------------------------------------------------
# The 2:4 regulariser and its proximal operator (pure functions of [groups, 4] tensors)

def groups_of_four(matrix: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out * in / 4, 4]: the groups of 4 consecutive inputs of each row."""
    return matrix.reshape(-1, GROUP)


def regulariser(w: torch.Tensor) -> torch.Tensor:
    """[groups, 4] -> [groups]: R(w) = sum over triples of |w_i w_j w_k| (zero iff <= 2 non-zeros)."""
    a = w.abs()
    return sum(a[:, i] * a[:, j] * a[:, k] for i, j, k in itertools.combinations(range(GROUP), 3))


def prox_objective(w: torch.Tensor, z: torch.Tensor, lam: float) -> torch.Tensor:
    """[groups]: 1/2 ||w - z||^2 + lam R(w), what the proximal operator minimises."""
    return 0.5 * (w - z).square().sum(dim=1) + lam * regulariser(w)


def alternating_minimisation(a: torch.Tensor, support: int, lam: float, iters: int, tol: float) -> torch.Tensor:
    """Minimise 1/2 ||w - a||^2 + lam R(w) over w >= 0 with w zero beyond the first `support`
    columns, by exact coordinate minimisation from w = 0, the last (smallest) coordinate first:
    w_i = max(a_i - lam * e2(the other w in the support), 0).  Stops after `iters` sweeps or when
    the summed absolute change of a sweep is below `tol`.  a: [groups, 4], sorted decreasing.

    A group whose sweep changed nothing is at a fixed point and would repeat itself exactly, so
    the sweeps go on over the moving groups only: the same result as sweeping them all."""
    cols = a.t().contiguous()  # one contiguous row per coordinate: the updates read whole rows
    w = torch.zeros_like(cols)
    active = None  # indices of the groups still swept (None: all)
    cur_a, cur_w = cols, w
    others = {i: [j for j in range(support) if j != i] for i in range(support)}
    for _ in range(iters):
        previous = cur_w.clone()
        for i in reversed(range(support)):
            pairs = sum(cur_w[j] * cur_w[k] for j, k in itertools.combinations(others[i], 2))
            torch.clamp_min(torch.sub(cur_a[i], pairs, alpha=lam), 0.0, out=cur_w[i])
        change = previous.sub_(cur_w).abs_()
        if float(change.sum()) < tol:
            break
        moving = change.amax(dim=0) > 0
        n_moving = int(moving.sum())
        if n_moving < 0.75 * moving.numel():  # compact now and then: indexing costs a pass too
            if active is not None:
                w[:, active] = cur_w
            active = moving.nonzero().squeeze(1) if active is None else active[moving]
            cur_a, cur_w = cols[:, active], w[:, active]
    if active is not None:
        w[:, active] = cur_w
    return w.t()


def prox_sweeps(a: torch.Tensor, support: int, lam: float, iters: int, tol: float) -> int:
    """How many sweeps alternating_minimisation runs on `a` (diagnostics for the notes)."""
    count = 0
    for count in range(1, iters + 1):
        if torch.equal(alternating_minimisation(a, support, lam, count, 0.0),
                       alternating_minimisation(a, support, lam, iters, tol)):
            break
    return count


def prox_2to4(weight: torch.Tensor, lam: float, iters: int = 100, tol: float = 1e-8) -> torch.Tensor:
    """The proximal operator of lam * R on every group of 4 consecutive inputs of `weight` ([out, in]
    or [groups, 4]); same shape and dtype, computed in float32 (float64 for float64 input).  The
    authors' enumeration: the best of the 2-sparse, 3-sparse and dense candidates on |weight|
    sorted per group.  On the CPU in float32 it runs as one C++ pass (_PROX_SOURCE: the same
    sweeps, the same stopping sweep, values equal to prox_2to4_torch within float rounding)."""
    if lam == 0:
        return weight.clone()
    z = groups_of_four(weight).to(torch.promote_types(weight.dtype, torch.float32))
    ext = _prox_extension() if z.device.type == "cpu" and z.dtype == torch.float32 else None
    if ext is None:
        return prox_2to4_torch(weight, lam, iters, tol)
    return ext.prox_2to4(z.contiguous(), float(lam), int(iters), float(tol)).view(weight.shape).to(weight.dtype)


def prox_2to4_torch(weight: torch.Tensor, lam: float, iters: int = 100, tol: float = 1e-8) -> torch.Tensor:
    """prox_2to4 as torch ops (the fallback off the CPU, in float64 or without a compiler; the
    reference the C++ pass is tested against)."""
    if lam == 0:
        return weight.clone()
    z = groups_of_four(weight).to(torch.promote_types(weight.dtype, torch.float32))
    a, order = z.abs().sort(dim=1, descending=True, stable=True)
    two = a.clone()
    two[:, KEEP:] = 0.0  # R = 0: the 2 largest kept as they are
    candidates = torch.stack([two, alternating_minimisation(a, 3, lam, iters, tol),
                              alternating_minimisation(a, 4, lam, iters, tol)])
    best = torch.stack([prox_objective(c, a, lam) for c in candidates]).argmin(dim=0)  # ties: the sparser
    w = candidates.gather(0, best.view(1, -1, 1).expand(1, -1, GROUP)).squeeze(0)
    out = torch.empty_like(w).scatter_(1, order, w) * z.sign()
    return out.view(weight.shape).to(weight.dtype)


# The operator in C++.  alternating_minimisation's sweeps stop for the whole matrix at the first
# sweep whose summed change is below tol.  Here the groups are cut into chunks of CHUNK (columns
# in chunk-local rows, one loop over the chunk's groups per sweep: it vectorises); every sweep runs
# over the chunks still moving (a chunk whose sweep changed nothing is at its fixed point and would
# repeat it exactly), then the chunks' changes are summed in chunk order in double (one result for
# any thread count) for the same stopping test.  -ffp-contract=off as concrete.py's kernels; the
# products and sums of an update in the torch code's order.
_PROX_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {
constexpr int64_t CHUNK = 256;  // groups swept together (small: a chunk sweeps while any of its groups moves)

inline float relu(float x) { return x > 0.f ? x : 0.f; }

// One sweep, smallest coordinate first; returns the summed |change| (as float lanes, then double).
template <int SUPPORT>
double sweep(const float* __restrict a0, const float* __restrict a1, const float* __restrict a2,
             const float* __restrict a3, float* __restrict w0, float* __restrict w1, float* __restrict w2,
             float* __restrict w3, float* __restrict ch, int64_t n, float lam) {
  for (int64_t t = 0; t < n; ++t) {
    const float p0 = w0[t], p1 = w1[t], p2 = w2[t], p3 = w3[t];
    float x0 = p0, x1 = p1, x2 = p2, x3 = p3;
    if (SUPPORT == 4) {
      x3 = relu(a3[t] - lam * ((x0 * x1 + x0 * x2) + x1 * x2));
      x2 = relu(a2[t] - lam * ((x0 * x1 + x0 * x3) + x1 * x3));
      x1 = relu(a1[t] - lam * ((x0 * x2 + x0 * x3) + x2 * x3));
      x0 = relu(a0[t] - lam * ((x1 * x2 + x1 * x3) + x2 * x3));
    } else {
      x2 = relu(a2[t] - lam * (x0 * x1));
      x1 = relu(a1[t] - lam * (x0 * x2));
      x0 = relu(a0[t] - lam * (x1 * x2));
    }
    w0[t] = x0; w1[t] = x1; w2[t] = x2; w3[t] = x3;
    ch[t] = (std::fabs(p0 - x0) + std::fabs(p1 - x1)) + (std::fabs(p2 - x2) + std::fabs(p3 - x3));
  }
  float acc[8] = {0};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int l = 0; l < 8; ++l) acc[l] += ch[t + l];
  double s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; t < n; ++t) s += ch[t];
  return s;
}

template <int SUPPORT>
void candidate(const float* cols, float* w, int64_t g, float lam, int iters, double tol) {
  // cols: per chunk, [4][n] sorted magnitudes; w: the candidate in the same layout.  All chunks
  // sweep in step, so the matrix's summed change is known after each sweep.
  const int64_t n_chunks = (g + CHUNK - 1) / CHUNK;
  std::fill(w, w + 4 * g, 0.f);
  std::vector<double> changes(n_chunks, 0.0);
  std::vector<char> moving(n_chunks, 1);
  for (int s = 1; s <= iters; ++s) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      float ch[CHUNK];
      for (int64_t c = c0; c < c1; ++c) {
        if (!moving[c]) { changes[c] = 0.0; continue; }  // at its fixed point: a sweep would repeat it
        const int64_t n = std::min(g - c * CHUNK, CHUNK);
        const float* a = cols + 4 * c * CHUNK;
        float* x = w + 4 * c * CHUNK;
        changes[c] = sweep<SUPPORT>(a, a + n, a + 2 * n, a + 3 * n, x, x + n, x + 2 * n, x + 3 * n, ch, n, lam);
        moving[c] = changes[c] != 0.0;
      }
    });
    double total = 0;  // in chunk order: the same for any thread count
    for (int64_t c = 0; c < n_chunks; ++c) total += changes[c];
    if (total < tol) break;
  }
}

inline float objective(float w0, float w1, float w2, float w3, float a0, float a1, float a2, float a3, float lam) {
  float sq = (w0 - a0) * (w0 - a0);
  sq += (w1 - a1) * (w1 - a1);
  sq += (w2 - a2) * (w2 - a2);
  sq += (w3 - a3) * (w3 - a3);
  float r = w0 * w1 * w2 + w0 * w1 * w3 + w0 * w2 * w3 + w1 * w2 * w3;
  return 0.5f * sq + lam * r;
}

// Each element's place in its group sorted by |z| decreasing, ties in order (a stable sort),
// without branches: rank_i = #{j < i: |z_j| >= |z_i|} + #{j > i: |z_j| > |z_i|}.
inline void ranks(float x0, float x1, float x2, float x3, int& r0, int& r1, int& r2, int& r3) {
  r0 = (x1 > x0) + (x2 > x0) + (x3 > x0);
  r1 = (x0 >= x1) + (x2 > x1) + (x3 > x1);
  r2 = (x0 >= x2) + (x1 >= x2) + (x3 > x2);
  r3 = (x0 >= x3) + (x1 >= x3) + (x2 >= x3);
}

inline float pick(int r, float v0, float v1, float v2, float v3) {
  return r == 0 ? v0 : (r == 1 ? v1 : (r == 2 ? v2 : v3));
}

// |z| sorted per group into the chunk's rows (chunk-local [4][n]).
void sort_chunk(const float* __restrict z, float* __restrict a, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    const float x0 = std::fabs(z[4 * t]), x1 = std::fabs(z[4 * t + 1]), x2 = std::fabs(z[4 * t + 2]),
                x3 = std::fabs(z[4 * t + 3]);
    int r0, r1, r2, r3;
    ranks(x0, x1, x2, x3, r0, r1, r2, r3);
    for (int r = 0; r < 4; ++r)
      a[r * n + t] = (r0 == r ? x0 : 0.f) + (r1 == r ? x1 : 0.f) + (r2 == r ? x2 : 0.f) + (r3 == r ? x3 : 0.f);
  }
}

// The best candidate (ties: the sparser), back in place with the signs of z.
void select_chunk(const float* __restrict z, const float* __restrict a, const float* __restrict w3,
                  const float* __restrict w4, float* __restrict out, int64_t n, float lam) {
  for (int64_t t = 0; t < n; ++t) {
    const float a0 = a[t], a1 = a[n + t], a2 = a[2 * n + t], a3 = a[3 * n + t];
    const float c0 = w3[t], c1 = w3[n + t], c2 = w3[2 * n + t], c3 = w3[3 * n + t];
    const float d0 = w4[t], d1 = w4[n + t], d2 = w4[2 * n + t], d3 = w4[3 * n + t];
    const float f2 = objective(a0, a1, 0.f, 0.f, a0, a1, a2, a3, lam);
    const float f3 = objective(c0, c1, c2, c3, a0, a1, a2, a3, lam);
    const float f4 = objective(d0, d1, d2, d3, a0, a1, a2, a3, lam);
    const bool take3 = f3 < f2, take4 = f4 < (take3 ? f3 : f2);
    const float b0 = take4 ? d0 : (take3 ? c0 : a0), b1 = take4 ? d1 : (take3 ? c1 : a1);
    const float b2 = take4 ? d2 : (take3 ? c2 : 0.f), b3 = take4 ? d3 : (take3 ? c3 : 0.f);
    const float z0 = z[4 * t], z1 = z[4 * t + 1], z2 = z[4 * t + 2], z3 = z[4 * t + 3];
    int r0, r1, r2, r3;
    ranks(std::fabs(z0), std::fabs(z1), std::fabs(z2), std::fabs(z3), r0, r1, r2, r3);
    const float v0 = pick(r0, b0, b1, b2, b3), v1 = pick(r1, b0, b1, b2, b3), v2 = pick(r2, b0, b1, b2, b3),
                v3 = pick(r3, b0, b1, b2, b3);
    out[4 * t] = z0 > 0.f ? v0 : (z0 < 0.f ? -v0 : 0.f);
    out[4 * t + 1] = z1 > 0.f ? v1 : (z1 < 0.f ? -v1 : 0.f);
    out[4 * t + 2] = z2 > 0.f ? v2 : (z2 < 0.f ? -v2 : 0.f);
    out[4 * t + 3] = z3 > 0.f ? v3 : (z3 < 0.f ? -v3 : 0.f);
  }
}
}  // namespace

torch::Tensor prox_2to4(torch::Tensor z, double lam_d, int64_t iters, double tol) {
  TORCH_CHECK(z.dtype() == torch::kFloat32 && z.is_contiguous() && z.dim() == 2 && z.size(1) == 4, "[groups, 4] float32");
  const int64_t g = z.size(0), n_chunks = (g + CHUNK - 1) / CHUNK;
  const float lam = (float)lam_d;
  const float* zp = z.data_ptr<float>();
  // One workspace kept between calls (callers hold the GIL: one call at a time): fresh pages for
  // every layer's buffers cost more than the operator itself here (first-touch page faults).
  static std::vector<float> workspace;
  if ((int64_t)workspace.size() < 12 * g) workspace.resize(12 * g);
  float* cols = workspace.data();
  float* three = cols + 4 * g;
  float* four = cols + 8 * g;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      sort_chunk(zp + 4 * c * CHUNK, cols + 4 * c * CHUNK, std::min(g - c * CHUNK, CHUNK));
  });
  candidate<3>(cols, three, g, lam, (int)iters, tol);
  candidate<4>(cols, four, g, lam, (int)iters, tol);
  auto out = torch::empty_like(z);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = 4 * c * CHUNK;
      select_chunk(zp + b, cols + b, three + b, four + b, op + b, std::min(g - c * CHUNK, CHUNK), lam);
    }
  });
  return out;
}
"""


@functools.lru_cache(maxsize=1)
def _prox_extension():
    """The compiled operator, or None (prox_2to4_torch is used).  Built as
    prunebench.engines.concrete's pass is (same flags, same build lock, same fallback)."""
    return optional_extension("prunebench_prox24", _PROX_SOURCE, ("prox_2to4",), _cflags(), _LDFLAGS,
                              "fused 2:4 proximal")


def frozen_deviation(relaxed: torch.Tensor, frozen: torch.Tensor, epsilon: float) -> torch.Tensor:
    """|| W' * (W' - W) / (|W| + epsilon) ||_F^2 (float32): the frozen-weight regulariser of one layer."""
    wr, w0 = relaxed.float(), frozen.float()
    return (wr * (wr - w0) / (w0.abs() + epsilon)).square().sum()


def top2_mask(relaxed: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """The final rule: in each group keep the 2 largest |W'| (ties: the larger frozen |W|, then the
    first); a bool mask of `relaxed`'s shape, exactly 2:4."""
    g, f = groups_of_four(relaxed.detach()).abs().float(), groups_of_four(frozen.detach()).abs().float()
    by_frozen = f.argsort(dim=1, descending=True, stable=True)
    rank = g.gather(1, by_frozen).argsort(dim=1, descending=True, stable=True)
    kept = by_frozen.gather(1, rank[:, :KEEP])
    return torch.zeros_like(g, dtype=torch.bool).scatter_(1, kept, True).view(relaxed.shape)


def check_2to4(spec: SparsitySpec, who: str = "ProxSparse") -> None:
    if spec.pattern != "nm" or (spec.n, spec.m) != (KEEP, GROUP):
        raise UserError(f"{who} learns 2:4 masks only, not {spec.pattern_name} (its regulariser and proximal "
                        "operator are the 2-of-4 ones)", hint="use 2:4")


# ---------------------------------------------------------------------------------------------
# The method

@register
class ProxSparse(LearnedMaskPruner):
    name = "proxsparse"
    engine_modules = ("prunebench.engines.concrete",)  # its kernel builds with concrete's flags
    display = "ProxSparse"
    summary = ("learned 2:4 masks, proximal gradient on a relaxed copy of the weights with the 2:4 regulariser "
               "(ProxSparse 2025)")
    capabilities = Capabilities(patterns=("nm",), needs_calibration=True, needs_gradients=True)

    @dataclass
    class Config(MaskTrainingConfig):
        PRESETS = PRESETS
        PRESET_PURPOSE: ClassVar[dict] = {
            "embedded": "the embedded default: SmolLM2-135M on a 2-core CPU at MaskLLM's embedded budget "
                        "(72 steps x 2 x 256 tokens), float32; lambda1 and lr carried to SmolLM2's 10x larger "
                        "weights (the preset's comment)",
            "tiny": "tiny random models in unit tests"}

        lambda1: Optional[float] = None  # strength of the 2:4 regulariser, per step (its proximal operator)
        lambda2: Optional[float] = None  # frozen-weight regulariser in the loss (0: off, the authors' --project_lambda2 0)
        epsilon: Optional[float] = None  # its denominator |W| + epsilon
        prox_iters: Optional[int] = None  # alternating-minimisation sweeps per candidate (100)
        prox_tol: Optional[float] = None  # stop a candidate's sweeps when its summed change is below this (1e-8)

        def validate(self):
            import math

            for name in ("lambda1", "lambda2", "epsilon", "prox_tol"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value < 0:
                    raise UserError(f"proxsparse: {name} must be a finite number >= 0, got {value!r}",
                                    hint="the LLaMA-2-7B script: lambda1=0.25 lambda2=0 (lambda2 1.0 with epsilon 0.1 "
                                         "in the LLaMA-3.1-8B one)")
            if self.epsilon == 0:
                raise UserError("proxsparse: epsilon must be > 0 (it keeps |W| + epsilon away from zero)",
                                hint="the authors use 0.1 or 0.5")
            if isinstance(self.prox_iters, bool) or not isinstance(self.prox_iters, int) or self.prox_iters < 1:
                raise UserError(f"proxsparse: prox_iters must be a whole number >= 1, got {self.prox_iters!r}",
                                hint="the authors run up to 100 sweeps")

    def check_spec(self, spec: SparsitySpec) -> None:
        check_2to4(spec, self.display)

    def schedule(self, step: int) -> dict:
        c = self.config
        return {"lr": c.lr * lr_factor(step, c.steps, c.warmup_steps, c.lr_schedule, c.lr_final_ratio)}

    def init_logits(self, model, modules, ctx, report) -> dict:
        bad = [name for name, m in modules.items() if weight_matrix(m).shape[1] % GROUP]
        if bad:
            raise UserError(f"{self.display}: {bad[0]} has an input width not divisible by 4 ({len(bad)} linears)",
                            hint="a 2:4 group needs 4 consecutive inputs")
        # the relaxed copy starts at the frozen weights (the engine casts it to logits_dtype)
        return {name: {"W": weight_matrix(m).detach().clone()} for name, m in modules.items()}

    def begin(self, modules, spec) -> None:
        self._frozen = {name: weight_matrix(m).detach() for name, m in modules.items()}

    def masked_weight(self, layer, index, logits, weight, seed, sched):
        relaxed = logits["W"]
        stats = {}
        if self.config.lambda2 > 0:
            stats["deviation"] = frozen_deviation(relaxed, weight, self.config.epsilon)
        return relaxed.to(weight.dtype), stats

    def regularisers(self, stats, sched):
        if self.config.lambda2 <= 0 or not stats:
            return [], {}
        total = torch.stack([s["deviation"] for s in stats.values()]).sum()
        return [self.config.lambda2 * total], {"deviation": float(total.detach())}

    def after_step(self, logits, step, sched) -> None:
        c = self.config
        for tensors in logits.values():
            p = tensors["W"]
            local = p.to_local() if hasattr(p, "to_local") else p  # sharded: this process's rows
            if local.numel():
                local.copy_(prox_2to4(local, c.lambda1, c.prox_iters, c.prox_tol))

    def hard_masks(self, logits, spec) -> dict:
        return {name: top2_mask(ps["W"], self._frozen[name].to(ps["W"].device)) for name, ps in logits.items()}

    def finish(self, logits, masks, spec, report) -> None:
        groups = at_most_two = agree = total = 0
        for name, ps in logits.items():
            g = groups_of_four(ps["W"])
            groups += g.shape[0]
            at_most_two += int(((g != 0).sum(dim=1) <= KEEP).sum())
            frozen = self._frozen[name].to(masks[name].device)
            agree += int((masks[name] == top2_mask(frozen, frozen)).sum())
            total += masks[name].numel()
        # how far the proximal steps took the relaxed copy towards 2:4, and how far the mask moved
        # from plain 2:4 magnitude pruning of the frozen weights
        report.stats["relaxed_groups_2sparse"] = round(at_most_two / max(groups, 1), 6)
        report.stats["magnitude_mask_agreement"] = round(agree / max(total, 1), 6)
        report.stats["authors_code_differences"] = AUTHORS_CODE
