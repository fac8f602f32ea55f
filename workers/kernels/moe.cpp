// Fused routed-expert FFN for CPU: every owned expert's SwiGLU FFN over the rows routed to it,
// no padding, one parallel region.
//
// Legend: T tokens, H hidden, I expert intermediate size, El owned experts, N (token, expert)
// pairs grouped by expert. Work items are (expert, block of up to ROWS rows) spread over the
// intra-op threads; each item runs single-threaded (nested parallelism is off inside the
// region), gathers its rows, computes silu(x W_gate^T) * (x W_up^T) * w, projects down into its
// rows of a [N, H] buffer, and a second parallel pass sums each token's pairs. The matmuls are
// ATen's (MKL/oneDNN sgemm, whose kernels pick AVX-512 or AVX2 at run time).

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t ROWS = 128;  // rows per work item: balance across threads vs per-call overhead

struct Item {
  int64_t expert, start, rows;
};

}  // namespace

// x [T, H]; tokens [N] int64, rows of x grouped by expert; weights [N] (x's dtype);
// counts [El] int64 on CPU (rows of each expert, in order); w13 [El, 2I, H]; w2 [El, H, I].
// Returns [T, H]: sum over each token's pairs of weight * FFN_e(x[token]).
torch::Tensor routed_ffn(torch::Tensor x, torch::Tensor tokens, torch::Tensor weights,
                         torch::Tensor counts, torch::Tensor w13, torch::Tensor w2) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [T, H] tensor");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "w13 [El, 2I, H] and w2 [El, H, I]");
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == torch::kInt64,
              "counts must be a CPU int64 tensor");
  const int64_t t = x.size(0), h = x.size(1), el = w13.size(0), i2 = w13.size(1), i = i2 / 2;
  TORCH_CHECK(counts.numel() == el, "counts needs one entry per owned expert");
  TORCH_CHECK(w13.size(2) == h && w2.size(1) == h && w2.size(2) == i, "weight shapes mismatch");
  torch::NoGradGuard no_grad;
  const int64_t n = tokens.numel();
  auto ys = torch::empty({n, h}, x.options());  // [N, H] each pair's weighted expert output
  std::vector<Item> items;
  const int64_t* c = counts.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < el; ++e) {
    for (int64_t r = 0; r < c[e]; r += ROWS) {
      items.push_back({e, start + r, std::min(ROWS, c[e] - r)});
    }
    start += c[e];
  }
  TORCH_CHECK(start == n, "counts must sum to the number of pairs");
  auto w = weights.view({n, 1});
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    // worker threads have their own grad and inference modes: take the caller's
    c10::InferenceMode inference_here(inference);
    torch::NoGradGuard no_grad_here;
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      auto rows = tokens.narrow(0, it.start, it.rows);
      auto xg = x.index_select(0, rows);                     // [n, H]
      auto hg = torch::mm(xg, w13[it.expert].t());           // [n, 2I]
      auto g = hg.narrow(1, 0, i);                           // [n, I] gate half, in place
      torch::silu_(g);
      g.mul_(hg.narrow(1, i, i)).mul_(w.narrow(0, it.start, it.rows));
      auto y = ys.narrow(0, it.start, it.rows);              // [n, H]
      torch::mm_out(y, g, w2[it.expert].t());
    }
  });
  auto out = torch::zeros({t, h}, x.options());
  out.index_add_(0, tokens, ys);
  return out;
}
