"""Sampled binary-concrete gates, M = sigmoid((alpha P + L) / tau) with L ~ Logistic(0, 1), and
the masked weight M * W, in one pass over the matrix.

Why a kernel of its own: on a CPU, drawing L with torch's generator (mt19937, one thread) and the
chain logit -> add -> scale -> sigmoid -> floor -> multiply -> sums costs about a fifth of a
dense forward+backward of the model (SmolLM2-135M: 0.78 s forward + 0.21 s backward of a 4.0 s
step, 106 M gates).  Here the noise is counter-based: the uniform of element i is a hash of
(seed, i), so it needs no generator state, parallelises over any number of threads with the
same result, and is computed where it is used.  The pass is C++ (built once per torch build and
flags with torch's extension builder, under prunebench.engines.kernel_build's lock, cached); where no
compiler is found, or off the CPU, the same hash runs as torch integer ops (same uniforms; the
log/exp then are torch's, so values agree to a few float32 ulps, not bit for bit).

The noise: h = mix(mix(uint32(i) * 0x9E3779B9 + k0) ^ k1) with (k0, k1) the two halves of the
64-bit seed and `mix` the lowbias32 integer hash (C. Wellons); U = max(h >> 8, 1) / 2^24 (24
bits, as torch.rand draws float32 uniforms, without the zero), L = log U - log(1 - U), so
|L| <= 16.6.
"""
from __future__ import annotations

import functools
import platform

import torch
from prunebench.engines.kernel_build import extension_folder, extension_name, optional_extension

MASK_FLOOR = 1e-12  # gates below this are exactly 0: no denormal products or gradients
GOLDEN32 = 0x9E3779B9
MASK32 = 0xFFFFFFFF

# The C++ pass.  exp and log are Cephes' float32 polynomials (as in many SIMD math libraries),
# written branch-free so the compiler vectorises the loops; -ffp-contract=off keeps the results
# the same on CPUs with and without FMA.  Sums use 8 fixed lanes per 4096-element chunk and
# chunks are added in order in double: the same result for any thread count.
# MATH_SOURCE (the counter hash, exp, log) is shared with prunebench.engines.fused_masks' kernels.
MATH_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {
constexpr int64_t CHUNK = 4096;
constexpr int LANES = 8;

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16; return x;
}
inline float as_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int32_t as_int(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }

inline float exp_poly(float x) {  // x clamped to [-80, 80]
  x = x < -80.f ? -80.f : (x > 80.f ? 80.f : x);
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // nearest integer (1.5 * 2^23)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * (r * r) + r + 1.0f;
  return y * as_float(((int32_t)n + 127) << 23);
}

inline float log_poly(float x) {  // x in [1e-6, 1], normal
  int32_t bits = as_int(x);
  float e = (float)(((bits >> 23) & 0xff) - 126);
  float m = as_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  float small = (float)(m < 0.707106781186547524f);  // 0 or 1: arithmetic, not a branch
  e = e - small;
  m = m - 1.0f + small * m;
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

inline float uniform(uint32_t i, uint32_t k0, uint32_t k1) {
  uint32_t k = mix32(mix32(i * 0x9E3779B9U + k0) ^ k1) >> 8;
  k += (k == 0);  // U in [2^-24, 1 - 2^-24]: both logs finite, 1 - U exact
  return (float)k * 5.9604644775390625e-8f;
}
}  // namespace
"""
_SOURCE = MATH_SOURCE + r"""
// One chunk of the forward pass (a function of its own, so the restrict-qualified pointers
// survive into the loop and it vectorises; inside the lambda they would be captured aliases).
static void forward_chunk(const float* __restrict p, const float* __restrict w, float* __restrict m,
                          float* __restrict o, int64_t start, int64_t stop, uint32_t k0, uint32_t k1,
                          float a, float inv_tau, float fl, double* sum, double* sq) {
  for (int64_t i = start; i < stop; ++i) {
    float u = uniform((uint32_t)i, k0, k1);
    float noise = log_poly(u) - log_poly(1.0f - u);
    float g = 1.0f / (1.0f + exp_poly(-(noise + a * p[i]) * inv_tau));
    g = g < fl ? 0.0f : g;
    m[i] = g;
    o[i] = g * w[i];
  }
  float acc[LANES] = {0}, acc2[LANES] = {0};
  int64_t i = start;
  for (; i + LANES <= stop; i += LANES)
    for (int l = 0; l < LANES; ++l) { acc[l] += m[i + l]; acc2[l] += o[i + l] * o[i + l]; }
  double s = 0, s2 = 0;
  for (int l = 0; l < LANES; ++l) { s += acc[l]; s2 += acc2[l]; }
  for (; i < stop; ++i) { s += m[i]; s2 += double(o[i]) * o[i]; }
  *sum = s; *sq = s2;
}

static void backward_range(const float* __restrict m, const float* __restrict w, const float* __restrict gw,
                           float* __restrict g, int64_t i0, int64_t i1, float gs, float gq2, float sc) {
  if (gw) {
    for (int64_t i = i0; i < i1; ++i)
      g[i] = ((gw[i] + gq2 * m[i] * w[i]) * w[i] + gs) * (m[i] - m[i] * m[i]) * sc;
  } else {
    for (int64_t i = i0; i < i1; ++i)
      g[i] = ((gq2 * m[i] * w[i]) * w[i] + gs) * (m[i] - m[i] * m[i]) * sc;
  }
}

// -> [mask, masked weight, sum of mask (double), sum of squares of masked (double)]
std::vector<torch::Tensor> concrete_forward(torch::Tensor logits, torch::Tensor weight, int64_t seed,
                                            double alpha, double tau, double floor) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(logits.is_contiguous() && weight.is_contiguous() && logits.numel() == weight.numel(), "layout");
  TORCH_CHECK(logits.numel() < (int64_t(1) << 32), "too many elements for a 32-bit counter");
  auto mask = torch::empty_like(logits);
  auto out = torch::empty_like(weight);
  const int64_t n = logits.numel(), n_chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> sums(n_chunks), sqs(n_chunks);
  const float* p = logits.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* m = mask.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const uint32_t k0 = (uint32_t)(uint64_t(seed) & 0xffffffffULL), k1 = (uint32_t)(uint64_t(seed) >> 32);
  const float a = (float)alpha, inv_tau = (float)(1.0 / tau), fl = (float)floor;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      forward_chunk(p, w, m, o, c * CHUNK, std::min(n, (c + 1) * CHUNK), k0, k1, a, inv_tau, fl,
                    &sums[c], &sqs[c]);
  });
  double s = 0, s2 = 0;
  for (int64_t c = 0; c < n_chunks; ++c) { s += sums[c]; s2 += sqs[c]; }
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  return {mask, out, torch::full({}, s, opts), torch::full({}, s2, opts)};
}

// dLoss/dP = ((g_W + 2 g_sq M W) W + g_sum) * M (1 - M) * scale; g_W may be empty.
torch::Tensor concrete_backward(torch::Tensor mask, torch::Tensor weight, torch::Tensor grad_masked,
                                double grad_sum, double grad_sq, double scale) {
  TORCH_CHECK(mask.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "float32 only");
  const bool has_g = grad_masked.defined() && grad_masked.numel() > 0;
  if (has_g) TORCH_CHECK(grad_masked.dtype() == torch::kFloat32 && grad_masked.is_contiguous(), "grad layout");
  auto grad = torch::empty_like(mask);
  const float* m = mask.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* gw = has_g ? grad_masked.data_ptr<float>() : nullptr;
  float* g = grad.data_ptr<float>();
  const float gs = (float)grad_sum, gq2 = (float)(2.0 * grad_sq), sc = (float)scale;
  at::parallel_for(0, mask.numel(), CHUNK, [&](int64_t i0, int64_t i1) {
    backward_range(m, w, gw, g, i0, i1, gs, gq2, sc);
  });
  return grad;
}
"""


def _cflags() -> list:
    # -fopenmp: at::parallel_for is an inline OpenMP loop, serial without it; the library it links
    # is the libgomp.so.1 torch has already loaded (one thread pool).
    flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    return flags


_PREFIX = "prunebench_concrete"  # the module name, before the digest of source and flags
_FUNCTIONS = ("concrete_forward", "concrete_backward")
_LDFLAGS = ("-fopenmp",)


@functools.lru_cache(maxsize=1)
def _extension():
    """The compiled pass, or None (the torch path is used: prunebench.engines.kernel_build's
    optional_extension).

    Built through prunebench.engines.kernel_build, not torch's load_inline in the shared
    ~/.cache/torch_extensions: there a builder killed while holding torch's lock file left every
    later build waiting forever; here the build folder is this torch build's own and its lock
    dies with its holder."""
    return optional_extension(_PREFIX, _SOURCE, _FUNCTIONS, _cflags(), _LDFLAGS, "fused concrete-gate")


def build_folder():
    """Where `_extension` builds (prunebench.engines.kernel_build's folder for this source and flags)."""
    return extension_folder(extension_name(_PREFIX, _SOURCE, _cflags()), _SOURCE, _cflags(), _LDFLAGS)


def backend(device) -> str:
    """'cpp' where the fused pass runs for this device, else 'torch'."""
    return "cpp" if torch.device(device).type == "cpu" and _extension() is not None else "torch"


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products wrap; the low 32 bits are right)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def counter_uniform(numel: int, seed: int, device=None) -> torch.Tensor:
    """The float32 uniforms of elements 0..numel-1 under `seed`, in [2^-24, 1 - 2^-24]."""
    if numel >= 1 << 32:  # the counter is 32-bit: beyond it the draws would repeat
        raise ValueError(f"{numel} gates in one matrix: more than a 32-bit counter covers")
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    i = torch.arange(numel, dtype=torch.int64, device=device)
    k = _mix32(_mix32((i * GOLDEN32 + k0) & MASK32) ^ k1) >> 8
    return k.clamp_(min=1).to(torch.float32) * 2.0 ** -24


def counter_logistic(shape, seed: int, device=None) -> torch.Tensor:
    """L = log U - log(1 - U) for the counter uniforms, in torch ops."""
    numel = 1
    for d in shape:
        numel *= int(d)
    u = counter_uniform(numel, seed, device).view(shape)
    return u.log() - torch.log1p(-u)


class ConcreteMaskedWeight(torch.autograd.Function):
    """(M * W, sum M, ||M * W||_F^2) with M = sigmoid((alpha P + L) / tau), L from the counter
    noise of `seed`; gates below MASK_FLOOR are 0.  Only M is saved (in `save_dtype`);
    dM/dP = (alpha / tau) M (1 - M)."""

    @staticmethod
    def forward(ctx, logits, weight, seed, alpha, tau, save_dtype):
        ext = _extension() if logits.device.type == "cpu" else None
        if ext is not None and weight.dtype == torch.float32:
            p = logits.detach().float().contiguous()
            mask, masked, mask_sum, masked_sq = ext.concrete_forward(p, weight.detach().contiguous(), int(seed),
                                                                     float(alpha), float(tau), MASK_FLOOR)
            mask_sum, masked_sq = mask_sum.float(), masked_sq.float()
        else:
            mask = counter_logistic(logits.shape, seed, logits.device)
            mask.add_(logits.float(), alpha=alpha).mul_(1.0 / tau).sigmoid_()
            mask.masked_fill_(mask < MASK_FLOOR, 0.0)
            masked = mask.to(weight.dtype) * weight
            mask_sum = mask.sum()
            masked_sq = torch.linalg.vector_norm(masked, dtype=torch.float32).square()
        ctx.save_for_backward(mask.to(save_dtype), weight)
        ctx.scale = alpha / tau
        ctx.logits_dtype = logits.dtype
        return masked.to(weight.dtype), mask_sum, masked_sq

    @staticmethod
    def backward(ctx, grad_masked, grad_sum, grad_sq):
        mask, weight = ctx.saved_tensors
        g_sum = 0.0 if grad_sum is None else float(grad_sum)
        g_sq = 0.0 if grad_sq is None else float(grad_sq)
        ext = _extension() if mask.device.type == "cpu" else None
        if ext is not None and weight.dtype == torch.float32:
            gw = grad_masked.float().contiguous() if grad_masked is not None else torch.empty(0)
            grad = ext.concrete_backward(mask.float().contiguous(), weight.contiguous(), gw, g_sum, g_sq, ctx.scale)
        else:
            m, w = mask.float(), weight.float()
            grad = m * w * (2.0 * g_sq)
            if grad_masked is not None:
                grad.add_(grad_masked.float())
            grad.mul_(w).add_(g_sum)
            grad.mul_(m - m * m).mul_(ctx.scale)
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def concrete_masked_weight(logits, weight, seed, alpha, tau, save_dtype=torch.float32):
    return ConcreteMaskedWeight.apply(logits, weight, seed, alpha, tau, save_dtype)
