// y = x W^T (+ b) for CPU fp32 with few rows: a decode step's projections (M = the batch) and
// the LM head (tall N). MKL/oneDNN's sgemm is tuned for large M and splits these small
// products poorly over threads; here the outputs are cut into panels of PANEL columns spread
// over the intra-op threads, each panel one gemm.h product over all M rows (its W rows read
// from memory once). Callers keep ATen for what it does better (kernels/__init__.py: linear).

#include "gemm.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t PANEL = 48;  // output columns per work item (a multiple of gemm::NR)

struct Product {
  const float* x;  // [M, K]
  const float* w;  // [N, K]
  float* y;        // [M, N]
  int64_t m, n, k;
};

MOE_INLINE void panel(const Product& p, int64_t j0, int64_t j1) {
  gemm::nt_gemm(p.x, p.k, p.w + j0 * p.k, p.k, p.y + j0, p.n, p.m, j1 - j0, p.k);
}

using PanelFn = void (*)(const Product&, int64_t, int64_t);
MOE_ISA_VARIANTS(panel, panel, (const Product& p, int64_t j0, int64_t j1), (p, j0, j1))

}  // namespace

// x [M, K] fp32 contiguous; weight [N, K] fp32 contiguous; bias [N] or undefined -> [M, N].
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 &&
                  weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be a contiguous fp32 [N, K] tensor");
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  auto y = torch::empty({m, n}, x.options());
  const Product p{x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), m, n, k};
  const PanelFn fn = pick_isa(panel_avx512, panel_avx2, panel_base);
  const int64_t panels = (n + PANEL - 1) / PANEL;
  struct None {};
  parallel_items<None>(panels, [&](int64_t q, None&) {
    fn(p, q * PANEL, std::min(n, (q + 1) * PANEL));
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}
