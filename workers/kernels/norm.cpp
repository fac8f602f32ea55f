// RMSNorm for CPU fp32 rows in one pass: y = weight * x / sqrt(mean(x^2) + eps), as
// transformers computes it (fp32 statistics). Replaces seven ATen ops (pow, mean, add, rsqrt,
// mul, cast, mul), each a pass over the tensor and, for a decode step's few rows, each mostly
// dispatch and thread wake-up cost.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace {

constexpr int64_t GRAIN = 64;  // rows per thread chunk: small steps stay on one thread

struct Rows {
  const float* x;  // [M, D]
  const float* w;  // [D]
  float* y;        // [M, D]
  int64_t d;
  float eps;
};

MOE_INLINE void norm_rows(const Rows& a, int64_t lo, int64_t hi) {
  const int64_t d = a.d, d8 = d - d % 8;
  for (int64_t r = lo; r < hi; ++r) {
    const float* x = a.x + r * d;
    float* y = a.y + r * d;
    v8f acc{};
    for (int64_t c = 0; c < d8; c += 8) {
      const v8f v = load8(x + c);
      acc += v * v;
    }
    float ss = hsum8(acc);
    for (int64_t c = d8; c < d; ++c) ss += x[c] * x[c];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + a.eps);
    for (int64_t c = 0; c < d8; c += 8) store8(y + c, load8(a.w + c) * (load8(x + c) * inv));
    for (int64_t c = d8; c < d; ++c) y[c] = a.w[c] * (x[c] * inv);
  }
}

using RowsFn = void (*)(const Rows&, int64_t, int64_t);
MOE_ISA_VARIANTS(norm, norm_rows, (const Rows& a, int64_t lo, int64_t hi), (a, lo, hi))

}  // namespace

// x [..., D] fp32; weight [D] fp32 -> [..., D].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32,
              "rms_norm takes fp32 tensors");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "weight must be [D]");
  x = x.contiguous();
  weight = weight.contiguous();
  auto y = torch::empty_like(x);
  const Rows a{x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), d,
               static_cast<float>(eps)};
  const RowsFn fn = pick_isa(norm_avx512, norm_avx2, norm_base);
  at::parallel_for(0, d ? x.numel() / d : 0, GRAIN,
                   [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  return y;
}
