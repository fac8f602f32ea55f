// RMSNorm for CPU fp32 rows in one pass: y = weight * x / sqrt(mean(x^2) + eps), as
// transformers computes it (fp32 statistics). Replaces seven ATen ops (pow, mean, add, rsqrt,
// mul, cast, mul), each a pass over the tensor and, for a decode step's few rows, each mostly
// dispatch and thread wake-up cost.

#include "kernels.h"

#include <ATen/Parallel.h>

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
  for (int64_t r = lo; r < hi; ++r) {
    rms_norm_row(a.x + r * a.d, a.w, a.y + r * a.d, a.d, a.eps);
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
