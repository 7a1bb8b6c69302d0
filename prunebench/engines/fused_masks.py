"""Sampled N:M pattern masks, optionally inside dense-or-N:M tile gates, and the masked weight, in
one pass over the matrix, on prunebench.engines.concrete's counter noise.

Each group of M consecutive inputs of a row has K logits P (one per pattern of the [K, M] table C).
A forward draws G = -log(-log U), U the counter uniform of the logit's flat index under `seed`,
and computes

    y = softmax((kappa P + G) / tau)         per group
    S = y @ C                                the group's soft N:M mask
    mask = S + T (1 - S)                     with T the group's tile gate (none: mask = S)

returning (mask * W, sum mask, ||mask * W||_F^2).  Why fused: drawn with torch's generator and
applied as separate ops, this costs about as much as the model's own forward+backward on a CPU
(six logits, two logs and an exp per group of four, a [groups, K] @ [K, M] product, five passes
over the matrix).  The C++ forward keeps y (K / M floats per weight, as many as the logits'
gradient) for backward, which writes that gradient over it: drawing the noise again cost more
than the rest of backward.  The torch path saves only its inputs and recomputes y.  The tile
gates T (one per tile, few) are computed by the caller in torch ops; the pass returns their
gradient, summed per tile in a fixed order.

The C++ shares concrete.py's build machinery and rules: -ffp-contract=off, work cut into chunks of
GROUP_CHUNK groups whatever the thread count, sums in fixed lanes then added in chunk order in
double, per-tile gradients summed by one thread per tile row in row order: one result for any
thread count.  Inside a chunk the per-group arithmetic runs across groups (one vector lane per
group) in the same order of operations per group as the torch formulas, so it vectorises.  Off the CPU, without a compiler, or for non-float32 weights, the same formulas run
as torch ops on the same uniforms (values agree to a few float32 ulps).
"""
from __future__ import annotations

import functools

import torch

from prunebench.engines.concrete import MATH_SOURCE, _LDFLAGS, _cflags, counter_uniform
from prunebench.engines.kernel_build import optional_extension
from prunebench.sparsity.patterns import expand_tiles, tile_sums

GROUP_CHUNK = 1024  # groups per unit of work (fixed: the sums' order must not depend on threads)

_SOURCE = MATH_SOURCE + r"""
namespace {
constexpr int64_t GROUP_CHUNK = 1024;  // (LANES: concrete.py's 8)

// Per-group quantities sit in rows of GROUP_CHUNK, one row per pattern k (or position j): loops
// run across groups, one vector lane per group, and the constant row stride tells the compiler
// that rows never overlap.  A chunk's probabilities live in the saved buffer in this layout.
constexpr int64_t ROW = GROUP_CHUNK;

// z[k][g] = (G + kappa P) / tau, G = -log(-log U) for the logit (g0 + g) K + k.
template <int KT>
void noisy_logits(const float* __restrict p, float* __restrict z, int64_t g0, int64_t n, int k_rt, uint32_t k0,
                  uint32_t k1, float kappa, float inv_tau) {
  const int K = KT ? KT : k_rt;
  for (int k = 0; k < K; ++k) {
    const float* pk = p + g0 * K + k;
    float* zk = z + k * ROW;
    const uint32_t i0 = (uint32_t)(g0 * K + k);
    for (int64_t t = 0; t < n; ++t) {
      float u = uniform(i0 + (uint32_t)t * (uint32_t)K, k0, k1);
      float g = -log_poly(-log_poly(u));
      zk[t] = (g + kappa * pk[t * K]) * inv_tau;
    }
  }
}

void exp_all(float* __restrict z, int64_t n) {
  for (int64_t t = 0; t < n; ++t) z[t] = exp_poly(z[t]);
}

// z -> y = softmax over the K rows, per group, in place (k in order, as the torch path sums).
template <int KT>
void softmax_groups(float* __restrict z, int64_t n, int k_rt) {
  const int K = KT ? KT : k_rt;
  for (int64_t g = 0; g < n; ++g) {
    float mx = z[g];
    for (int k = 1; k < K; ++k) mx = z[k * ROW + g] > mx ? z[k * ROW + g] : mx;
    for (int k = 0; k < K; ++k) z[k * ROW + g] -= mx;
  }
  for (int k = 0; k < K; ++k) exp_all(z + k * ROW, n);
  for (int64_t g = 0; g < n; ++g) {
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += z[k * ROW + g];
    float inv = 1.0f / s;
    for (int k = 0; k < K; ++k) z[k * ROW + g] *= inv;
  }
}

// s[j][g] = sum_k y[k][g] C[k][j], k in order.
template <int KT, int MT>
void soft_masks(const float* __restrict y, const float* __restrict table, float* __restrict s, int64_t n, int k_rt,
                int m_rt) {
  const int K = KT ? KT : k_rt, M = MT ? MT : m_rt;
  for (int j = 0; j < M; ++j) {
    float* sj = s + j * ROW;
    for (int64_t g = 0; g < n; ++g) sj[g] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float c = table[k * M + j];
      const float* yk = y + k * ROW;
      for (int64_t g = 0; g < n; ++g) sj[g] += yk[g] * c;
    }
  }
}

// Each group's tile gate (0 without gates).  Groups never straddle a tile: tile % M == 0.  The
// tile column is stepped along the row (no division per group).
void group_gates(const float* gate, float* tg, int64_t g0, int64_t n_groups, int64_t M, int64_t cols,
                 int64_t tile, int64_t tile_cols) {
  if (!gate) { for (int64_t g = 0; g < n_groups; ++g) tg[g] = 0.f; return; }
  int64_t row = (g0 * M) / cols, col = (g0 * M) % cols;
  const float* grow = gate + (row / tile) * tile_cols;
  int64_t tc = col / tile, in_tile = col % tile;
  for (int64_t g = 0; g < n_groups; ++g) {
    tg[g] = grow[tc];
    col += M; in_tile += M;
    if (in_tile == tile) { in_tile = 0; ++tc; }
    if (col == cols) { col = 0; ++row; tc = 0; in_tile = 0; grow = gate + (row / tile) * tile_cols; }
  }
}

// mask[g][j] = S + T (1 - S), in the weight's layout.
template <int MT>
void combine_groups(const float* __restrict s, const float* __restrict tg, float* __restrict mask, int64_t n,
                    int m_rt) {
  const int M = MT ? MT : m_rt;
  for (int64_t g = 0; g < n; ++g)
    for (int j = 0; j < M; ++j) {
      const float sj = s[j * ROW + g];
      mask[g * M + j] = sj + tg[g] * (1.0f - sj);
    }
}

// rows [K][ROW] -> the logits' layout [n][K]
template <int KT>
void to_groups(const float* __restrict src, float* __restrict dst, int64_t n, int k_rt) {
  const int K = KT ? KT : k_rt;
  for (int64_t g = 0; g < n; ++g)
    for (int k = 0; k < K; ++k) dst[g * K + k] = src[k * ROW + g];
}

// dLoss/dmask = g_W W + g_sum + 2 g_sq mask W^2; dS = dmask (1 - T); dT += dmask (1 - S);
// dy = C dS; dP = y (dy - <y, dy>) kappa / tau.  For 2:4 and 1:4 the per-group arrays are
// fixed-size locals, which the compiler keeps in registers, so the loop over groups vectorises.
template <int KT, int MT, bool GW>
void backward_groups(const float* __restrict y, const float* __restrict s, const float* __restrict tg,
                     const float* __restrict w, const float* __restrict gw, const float* __restrict table, float gs,
                     float gq2, float scale, float* __restrict dpt, float* __restrict pt_out, int64_t n, int k_rt,
                     int m_rt) {
  const int K = KT ? KT : k_rt, M = MT ? MT : m_rt;
  constexpr bool fixed = KT > 0 && MT > 0;
  float ds_fixed[fixed ? MT : 1], dy_fixed[fixed ? KT : 1], tab[fixed ? KT * MT : 1];
  std::vector<float> ds_v(fixed ? 0 : M), dy_v(fixed ? 0 : K);
  float* ds = fixed ? ds_fixed : ds_v.data();
  float* dy = fixed ? dy_fixed : dy_v.data();
  if (fixed) for (int i = 0; i < K * M; ++i) tab[i] = table[i];
  const float* C = fixed ? tab : table;
  for (int64_t g = 0; g < n; ++g) {
    const float t = tg[g];
    float pt = 0.f;
    for (int j = 0; j < M; ++j) {
      const float sj = s[j * ROW + g], wj = w[g * M + j];
      const float m = sj + t * (1.0f - sj);
      float d = gq2 * m * wj * wj + gs;
      if (GW) d = d + gw[g * M + j] * wj;
      ds[j] = d * (1.0f - t);
      pt += d * (1.0f - sj);
    }
    float dot = 0.f;
    for (int k = 0; k < K; ++k) {
      float acc = 0.f;
      for (int j = 0; j < M; ++j) acc += C[k * M + j] * ds[j];
      dy[k] = acc;
      dot += y[k * ROW + g] * acc;
    }
    for (int k = 0; k < K; ++k) dpt[k * ROW + g] = y[k * ROW + g] * (dy[k] - dot) * scale;
    pt_out[g] = pt;
  }
}

struct Args {
  const float* p; const float* table; const float* w; const float* gate;
  int64_t n_groups, K, M, cols, tile, tile_cols;
  uint32_t k0, k1; float kappa, inv_tau;
};

Args make_args(const torch::Tensor& table, const torch::Tensor& weight, const torch::Tensor& gate, int64_t tile) {
  TORCH_CHECK(weight.dtype() == torch::kFloat32 && table.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(weight.is_contiguous() && table.is_contiguous() && table.dim() == 2 && weight.dim() == 2, "layout");
  Args a{};
  a.K = table.size(0); a.M = table.size(1);
  TORCH_CHECK(weight.size(1) % a.M == 0, "shapes");
  a.n_groups = weight.numel() / a.M;
  TORCH_CHECK(a.n_groups * a.K < (int64_t(1) << 32), "too many logits for a 32-bit counter");
  a.table = table.data_ptr<float>(); a.w = weight.data_ptr<float>();
  a.cols = weight.size(1);
  const bool gated = gate.defined() && gate.numel() > 0;
  a.gate = gated ? gate.data_ptr<float>() : nullptr;
  a.tile = tile; a.tile_cols = gated ? gate.size(1) : 0;
  if (gated) TORCH_CHECK(gate.dtype() == torch::kFloat32 && gate.is_contiguous() && tile % a.M == 0 &&
                         gate.size(0) * tile >= weight.size(0) && gate.size(1) * tile >= weight.size(1), "tiles");
  return a;
}

int64_t chunks_of(const Args& a) { return (a.n_groups + GROUP_CHUNK - 1) / GROUP_CHUNK; }

// The probabilities, chunk c at [c * GROUP_CHUNK * K, ...) as K rows of GROUP_CHUNK.
torch::Tensor probability_buffer(const Args& a, const torch::Tensor& like) {
  return torch::empty({chunks_of(a) * GROUP_CHUNK * a.K}, like.options());
}

template <int KT, int MT>
void forward_chunks(const Args& a, float* out, float* ybuf, double* sums, double* sqs, int64_t c0, int64_t c1) {
  const int K = KT ? KT : a.K, M = MT ? MT : a.M;
  std::vector<float> s(ROW * M), tg(GROUP_CHUNK), mask(GROUP_CHUNK * M);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t g0 = c * GROUP_CHUNK, n = std::min(a.n_groups - g0, GROUP_CHUNK);
    float* y = ybuf + g0 * K;
    noisy_logits<KT>(a.p, y, g0, n, K, a.k0, a.k1, a.kappa, a.inv_tau);
    softmax_groups<KT>(y, n, K);
    soft_masks<KT, MT>(y, a.table, s.data(), n, K, M);
    group_gates(a.gate, tg.data(), g0, n, M, a.cols, a.tile, a.tile_cols);
    combine_groups<MT>(s.data(), tg.data(), mask.data(), n, M);
    const float* w = a.w + g0 * M;
    const float* m = mask.data();
    float* o = out + g0 * M;
    const int64_t len = n * M;
    for (int64_t i = 0; i < len; ++i) o[i] = m[i] * w[i];
    float acc[LANES] = {0}, acc2[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= len; i += LANES)
      for (int l = 0; l < LANES; ++l) { acc[l] += m[i + l]; acc2[l] += o[i + l] * o[i + l]; }
    double sm = 0, sq = 0;
    for (int l = 0; l < LANES; ++l) { sm += acc[l]; sq += acc2[l]; }
    for (; i < len; ++i) { sm += m[i]; sq += double(o[i]) * o[i]; }
    sums[c] = sm; sqs[c] = sq;
  }
}

// dp may be ybuf itself: chunk c's gradient [g0 K, (g0 + n) K) lies inside chunk c's
// probabilities, which are read into dpt's rows before it is written.
template <int KT, int MT>
void backward_chunks(const Args& a, const float* ybuf, const float* gw, float gs, float gq2, float scale, float* dp,
                     float* dt_group, int64_t c0, int64_t c1) {
  const int K = KT ? KT : a.K, M = MT ? MT : a.M;
  std::vector<float> s(ROW * M), tg(GROUP_CHUNK), dpt(ROW * K), pt(GROUP_CHUNK);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t g0 = c * GROUP_CHUNK, n = std::min(a.n_groups - g0, GROUP_CHUNK);
    const float* y = ybuf + g0 * K;
    soft_masks<KT, MT>(y, a.table, s.data(), n, K, M);
    group_gates(a.gate, tg.data(), g0, n, M, a.cols, a.tile, a.tile_cols);
    const float* w = a.w + g0 * M;
    if (gw) backward_groups<KT, MT, true>(y, s.data(), tg.data(), w, gw + g0 * M, a.table, gs, gq2, scale,
                                          dpt.data(), pt.data(), n, K, M);
    else backward_groups<KT, MT, false>(y, s.data(), tg.data(), w, nullptr, a.table, gs, gq2, scale, dpt.data(),
                                        pt.data(), n, K, M);
    to_groups<KT>(dpt.data(), dp + g0 * K, n, K);
    if (dt_group) std::memcpy(dt_group + g0, pt.data(), n * sizeof(float));
  }
}

}  // namespace

// Specialised loops for 2:4 (6 patterns of 4) and 1:4; any other N:M runs the generic ones.
#define PB_DISPATCH(K, M, CALL) \
  if ((K) == 6 && (M) == 4) { CALL(6, 4); } else if ((K) == 4 && (M) == 4) { CALL(4, 4); } else { CALL(0, 0); }

// -> [masked weight, sum of mask (double), sum of squares of masked (double), probabilities y
// (pattern_backward's input, in its own chunked layout)]
std::vector<torch::Tensor> pattern_forward(torch::Tensor logits, torch::Tensor table, torch::Tensor weight,
                                           torch::Tensor gate, int64_t tile, int64_t seed, double kappa, double tau) {
  Args a = make_args(table, weight, gate, tile);
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.is_contiguous() && logits.dim() == 2 &&
              logits.size(0) == a.n_groups && logits.size(1) == a.K, "logits layout");
  a.p = logits.data_ptr<float>();
  a.k0 = (uint32_t)(uint64_t(seed) & 0xffffffffULL); a.k1 = (uint32_t)(uint64_t(seed) >> 32);
  a.kappa = (float)kappa; a.inv_tau = (float)(1.0 / tau);
  auto out = torch::empty_like(weight);
  auto ybuf = probability_buffer(a, logits);
  const int64_t n_chunks = chunks_of(a);
  std::vector<double> sums(n_chunks), sqs(n_chunks);
  float* o = out.data_ptr<float>();
  float* yb = ybuf.data_ptr<float>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
#define PB_FWD(KT, MT) forward_chunks<KT, MT>(a, o, yb, sums.data(), sqs.data(), c0, c1)
    PB_DISPATCH(a.K, a.M, PB_FWD)
#undef PB_FWD
  });
  double s = 0, s2 = 0;
  for (int64_t c = 0; c < n_chunks; ++c) { s += sums[c]; s2 += sqs[c]; }
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  return {out, torch::full({}, s, opts), torch::full({}, s2, opts), ybuf};
}

// -> [dLoss/dlogits, dLoss/dgate (empty without gates)]; grad_masked may be empty.  in_place:
// the logits' gradient is written over `probs` (which is then spent) instead of a new tensor.
std::vector<torch::Tensor> pattern_backward(torch::Tensor probs, torch::Tensor table, torch::Tensor weight,
                                            torch::Tensor gate, int64_t tile, double scale_d,
                                            torch::Tensor grad_masked, double grad_sum, double grad_sq,
                                            bool in_place) {
  Args a = make_args(table, weight, gate, tile);
  TORCH_CHECK(probs.dtype() == torch::kFloat32 && probs.is_contiguous() &&
              probs.numel() == chunks_of(a) * GROUP_CHUNK * a.K, "probabilities layout");
  const bool has_g = grad_masked.defined() && grad_masked.numel() > 0;
  if (has_g) TORCH_CHECK(grad_masked.dtype() == torch::kFloat32 && grad_masked.is_contiguous() &&
                         grad_masked.numel() == weight.numel(), "grad layout");
  const float* gw = has_g ? grad_masked.data_ptr<float>() : nullptr;
  torch::Tensor dp = in_place ? probs.narrow(0, 0, a.n_groups * a.K).view({a.n_groups, a.K})
                              : torch::empty({a.n_groups, a.K}, probs.options());
  torch::Tensor dt_group = a.gate ? torch::empty({a.n_groups}, probs.options()) : torch::Tensor();
  float* dtg = a.gate ? dt_group.data_ptr<float>() : nullptr;
  float* dpp = dp.data_ptr<float>();
  const float* yb = probs.data_ptr<float>();
  const float gs = (float)grad_sum, gq2 = (float)(2.0 * grad_sq), scale = (float)scale_d;
  const int64_t n_chunks = chunks_of(a);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
#define PB_BWD(KT, MT) backward_chunks<KT, MT>(a, yb, gw, gs, gq2, scale, dpp, dtg, c0, c1)
    PB_DISPATCH(a.K, a.M, PB_BWD)
#undef PB_BWD
  });
  if (!a.gate) return {dp, torch::empty({0}, probs.options())};
  // Per-tile sums: one thread per tile row, rows and groups in order (the same for any thread count).
  auto dgate = torch::zeros_like(gate);
  float* dg = dgate.data_ptr<float>();
  const int64_t rows = weight.size(0), groups_per_row = a.cols / a.M, tile_rows = gate.size(0);
  at::parallel_for(0, tile_rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<double> acc(a.tile_cols);
    for (int64_t tr = r0; tr < r1; ++tr) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t r = tr * a.tile; r < std::min(rows, (tr + 1) * a.tile); ++r)
        for (int64_t tc = 0, q = 0; tc < a.tile_cols; ++tc)  // a tile's groups in order: no division per group
          for (const int64_t q1 = std::min(groups_per_row, (tc + 1) * (a.tile / a.M)); q < q1; ++q)
            acc[tc] += dtg[r * groups_per_row + q];
      for (int64_t tc = 0; tc < a.tile_cols; ++tc) dg[tr * a.tile_cols + tc] = (float)acc[tc];
    }
  });
  return {dp, dgate};
}
"""

_FUNCTIONS = ("pattern_forward", "pattern_backward")


@functools.lru_cache(maxsize=1)
def _extension():
    """The compiled passes, or None (the torch path is used).  Built as concrete.py's pass is
    (prunebench.engines.kernel_build's optional_extension: a folder of its own, a lock that dies
    with its holder; a stuck live holder is a one-line UserError)."""
    return optional_extension("prunebench_fused_masks", _SOURCE, _FUNCTIONS, _cflags(), _LDFLAGS, "fused pattern-mask")


def backend(device) -> str:
    """'cpp' where the fused pass runs for this device, else 'torch'."""
    return "cpp" if torch.device(device).type == "cpu" and _extension() is not None else "torch"


# ---------------------------------------------------------------------------------------------
# The math as torch ops (the fallback, and the reference the tests hold the kernel to)

def counter_gumbel(shape, seed: int, device=None) -> torch.Tensor:
    """G = -log(-log U) for the counter uniforms of `seed` (U in [2^-24, 1 - 2^-24]: |G| <= 16.6)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return counter_uniform(numel, seed, device).view(shape).log_().neg_().log_().neg_()


def pattern_probabilities(logits: torch.Tensor, seed: int, kappa: float, tau: float) -> torch.Tensor:
    """y = softmax((kappa P + G) / tau) over the last dimension, [groups, K], float32."""
    z = counter_gumbel(logits.shape, seed, logits.device).add_(logits.float(), alpha=kappa).mul_(1.0 / tau)
    return torch.softmax(z, dim=-1)


def group_gates(gate: torch.Tensor, tile: int, shape) -> torch.Tensor:
    """[tile rows, tile cols] gates broadcast over their tiles: [out, in]."""
    return expand_tiles(gate.float(), tile, shape)


def combine(soft_nm: torch.Tensor, gate_full) -> torch.Tensor:
    """mask = S + T (1 - S) (a dense tile keeps everything); S itself without gates."""
    return soft_nm if gate_full is None else soft_nm + gate_full * (1.0 - soft_nm)


def pattern_mask_torch(logits, table, shape, seed, kappa, tau, gate=None, tile=0):
    """The soft mask [out, in] as plain differentiable torch ops (reference)."""
    y = pattern_probabilities(logits, seed, kappa, tau)
    soft = (y @ table.float()).view(shape)
    return combine(soft, None if gate is None else group_gates(gate, tile, shape))


def pattern_backward_torch(logits, table, weight, gate, tile, seed, kappa, tau, grad_masked, grad_sum, grad_sq):
    """(dLoss/dP, dLoss/dT) by the chain rule written out, recomputing y and the mask: the fallback's
    backward (see the C++'s comment for the formulas)."""
    w = weight.float()
    y = pattern_probabilities(logits, seed, kappa, tau)
    soft = (y @ table.float()).view(w.shape)
    t = None if gate is None else group_gates(gate, tile, w.shape)
    mask = combine(soft, t)
    d = mask * w * w * (2.0 * grad_sq) + grad_sum
    if grad_masked is not None:
        d.add_(grad_masked.float() * w)
    dgate = None if t is None else tile_sums(d * (1.0 - soft), tile)
    ds = d if t is None else d * (1.0 - t)
    dy = ds.reshape(-1, table.shape[1]) @ table.float().t()
    dp = dy.sub_((y * dy).sum(dim=-1, keepdim=True)).mul_(y).mul_(kappa / tau)
    return dp, dgate


class PatternMaskedWeight(torch.autograd.Function):
    """(mask * W, sum mask, ||mask * W||_F^2) with mask = S + T (1 - S), S the sampled soft N:M mask
    of the [groups, K] logits (noise of `seed`) and T the [tile rows, tile cols] gates (or None).
    The C++ path keeps the sampled probabilities y for backward (K floats per group, and the logits'
    gradient is then written over them); the torch path saves only its inputs and recomputes."""

    @staticmethod
    def forward(ctx, logits, gate, weight, table, seed, kappa, tau, tile):
        ext = _extension() if logits.device.type == "cpu" else None
        ctx.fused = ext is not None and weight.dtype == torch.float32
        ctx.spent = False  # set once a backward has written the gradient over the probabilities
        probs = None
        if ctx.fused:
            masked, mask_sum, masked_sq, probs = ext.pattern_forward(*_fused_inputs(logits, gate, weight, table, tile),
                                                                     int(seed), float(kappa), float(tau))
            mask_sum, masked_sq = mask_sum.float(), masked_sq.float()
        else:
            mask = pattern_mask_torch(logits.detach(), table, weight.shape, seed, kappa, tau,
                                      None if gate is None else gate.detach(), tile)
            masked = mask.to(weight.dtype) * weight
            mask_sum = mask.sum()
            masked_sq = torch.linalg.vector_norm(masked, dtype=torch.float32).square()
        # saved, not kept on ctx: activation checkpointing then drops and recomputes y as well
        ctx.save_for_backward(logits, gate, weight, table, probs)
        ctx.args = (int(seed), float(kappa), float(tau), int(tile))
        return masked, mask_sum, masked_sq

    @staticmethod
    def backward(ctx, grad_masked, grad_sum, grad_sq):
        logits, gate, weight, table, probs = ctx.saved_tensors
        seed, kappa, tau, tile = ctx.args
        g_sum = 0.0 if grad_sum is None else float(grad_sum)
        g_sq = 0.0 if grad_sq is None else float(grad_sq)
        if ctx.fused:
            inputs = _fused_inputs(logits, gate, weight, table, tile)
            if ctx.spent:  # a second backward through a retained graph: draw y again (same values)
                probs = _extension().pattern_forward(*inputs, seed, kappa, tau)[3]
            ctx.spent = True  # the gradient is written over probs below
            gw = grad_masked.float().contiguous() if grad_masked is not None else torch.empty(0)
            dp, dgate = _extension().pattern_backward(probs, *inputs[1:], kappa / tau, gw, g_sum, g_sq, True)
            dgate = dgate if gate is not None else None
        else:
            dp, dgate = pattern_backward_torch(logits.detach(), table, weight.detach(), None if gate is None else
                                               gate.detach(), tile, seed, kappa, tau, grad_masked, g_sum, g_sq)
        dgate = None if dgate is None or not ctx.needs_input_grad[1] else dgate.to(gate.dtype)
        return dp.to(logits.dtype), dgate, None, None, None, None, None, None


def _fused_inputs(logits, gate, weight, table, tile):
    """The C++ passes' tensor arguments: (logits, table, weight, gate or an empty tensor, tile)."""
    g = gate.detach().float().contiguous() if gate is not None else torch.empty(0)
    return (logits.detach().float().contiguous(), table.float().contiguous(), weight.detach().contiguous(), g,
            int(tile))


def pattern_masked_weight(logits, weight, table, seed, kappa, tau, gate=None, tile=0):
    """(mask * W, sum mask, ||mask * W||_F^2); logits [out * in / M, K], weight [out, in], table [K, M]."""
    if gate is not None and (tile <= 0 or tile % table.shape[1]):
        raise ValueError(f"tile {tile} must be a positive multiple of the group size {table.shape[1]}")
    return PatternMaskedWeight.apply(logits, gate, weight, table, seed, kappa, tau, tile)
