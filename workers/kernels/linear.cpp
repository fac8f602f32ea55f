// y = x W^T (+ b) for CPU fp32 projections of up to a few hundred rows: a decode step's
// projections (M = the batch), the LM head, short prefill chunks. W is read packed in panels
// of 16 outputs (kernels.pack_panels: [ceil(N / 16), K, 16], one sequential stream per panel);
// work items are (block of rows, panel) pairs taken by the intra-op threads, so a narrow
// product (the router's 16 outputs) still uses every thread. MKL's sgemm repacks W on every
// call and splits small-M products poorly: at 64 rows it reached 100-118 GFLOP/s on two
// threads against 150-175 here (`python -m bench.gemm`). Callers keep ATen for large M
// (kernels/__init__.py: linear).

#include "gemm.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t ROW_BLOCK = 64;  // rows per work item: a block of x stays in L2 across panels

struct Product {
  const float* x;   // [M, K]
  const float* wp;  // [P, K, 16]
  float* y;         // [M, N]
  int64_t m, n, k;
};

// Rows per register tile: 8 with AVX-512's 32 registers (12 measured slower at K = 1,024: the
// 12 rows of x no longer share L1 with the panel), 6 with 16.
template <int MAXR>
MOE_INLINE void item(const Product& p, int64_t r0, int64_t q) {
  const int64_t rows = std::min(ROW_BLOCK, p.m - r0);
  const int64_t cols = std::min<int64_t>(gemm::PACK, p.n - q * gemm::PACK);
  gemm::packed_gemm<MAXR>(p.x + r0 * p.k, p.k, p.wp + q * p.k * gemm::PACK,
                          p.y + r0 * p.n + q * gemm::PACK, p.n, rows, cols, p.k);
}

MOE_AVX512 void item_avx512(const Product& p, int64_t r0, int64_t q) { item<8>(p, r0, q); }
MOE_AVX2 void item_avx2(const Product& p, int64_t r0, int64_t q) { item<gemm::PR>(p, r0, q); }
void item_base(const Product& p, int64_t r0, int64_t q) { item<gemm::PR>(p, r0, q); }
using ItemFn = void (*)(const Product&, int64_t, int64_t);

}  // namespace

// x [M, K] fp32 contiguous; packed [ceil(N / 16), K, 16] fp32 (pack_panels of W [N, K]);
// bias [N] or undefined -> [M, N].
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, int64_t n,
                     c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  const int64_t m = x.size(0), k = x.size(1), panels = (n + gemm::PACK - 1) / gemm::PACK;
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kFloat32 &&
                  packed.is_contiguous() && packed.size(0) == panels && packed.size(1) == k &&
                  packed.size(2) == gemm::PACK,
              "packed must be pack_panels of an fp32 [N, K] weight");
  auto y = torch::empty({m, n}, x.options());
  const Product p{x.data_ptr<float>(), packed.data_ptr<float>(), y.data_ptr<float>(), m, n, k};
  const ItemFn fn = pick_isa(item_avx512, item_avx2, item_base);
  const int64_t blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK;
  struct None {};
  parallel_items<None>(blocks * panels, [&](int64_t it, None&) {
    fn(p, (it / panels) * ROW_BLOCK, it % panels);
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}
