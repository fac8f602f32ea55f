// Fused routed-expert FFN for CPU: every owned expert's SwiGLU FFN over the rows routed to it,
// no padding, one parallel region.
//
// Legend: T tokens, H hidden, I expert intermediate size, El owned experts, N (token, expert)
// pairs grouped by expert. Work items are (expert, block of up to ROWS rows), taken largest
// first from a shared counter by the intra-op threads; each item runs single-threaded (nested
// parallelism is off inside the region), gathers its rows, computes
// silu(x W_gate^T) * (x W_up^T) * w, projects down into its rows of a [N, H] buffer; one
// sum in pair order (index_add_'s) then adds up each token's pairs. fp32 items of up to SMALL
// rows (a decode step's few rows per expert) run gemm.h's register-tiled product and a
// vectorized SwiGLU, compiled per instruction set, with no ATen call; larger items and other
// dtypes use ATen's matmuls (MKL/oneDNN sgemm, tuned for large M).

#include "gemm.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace {

constexpr int64_t ROWS = 128;  // rows per work item: balance across threads vs per-call overhead
constexpr int64_t SMALL = 32;  // items of at most this many fp32 rows take the small-M path
constexpr int64_t SUM_PAIRS = 4096;  // pairs summed by a plain loop (more: index_add_'s threads)

struct Item {
  int64_t expert, start, rows;
};

struct Ffn {
  const float* x;        // [T, H]
  const int64_t* tokens; // [N]
  const float* weights;  // [N]
  const float* w13;      // [El, 2I, H], or packed [El, 2I / 16, H, 16] (gemm.h)
  const float* w2;       // [El, H, I], or packed [El, H / 16, I, 16]
  bool packed;
  float* ys;             // [N, H]
  int64_t h, i;

  // rows of one expert's weight block in its layout (packed: padded to whole panels)
  int64_t rows(int64_t n) const {
    return packed ? (n + gemm::PACK - 1) / gemm::PACK * gemm::PACK : n;
  }
};

// One item on the small-M path; buf holds [rows, H] gathered rows then [rows, 2I]. MAXR: rows
// per packed tile (gemm.h), by the instruction set's register count.
template <int MAXR>
MOE_INLINE void small_item(const Ffn& f, const Item& it, float* buf) {
  const int64_t h = f.h, i = f.i, n = it.rows;
  float* xg = buf;              // [n, H]
  float* hg = buf + n * h;      // [n, 2I]: gate | up, then silu(gate) * up * w in the gate half
  for (int64_t r = 0; r < n; ++r) {
    const float* src = f.x + f.tokens[it.start + r] * h;
    std::copy(src, src + h, xg + r * h);
  }
  const float* w13 = f.w13 + it.expert * f.rows(2 * i) * h;
  if (f.packed) {
    gemm::packed_gemm<MAXR>(xg, h, w13, hg, 2 * i, n, 2 * i, h);
  } else {
    gemm::nt_gemm(xg, h, w13, h, hg, 2 * i, n, 2 * i, h);
  }
  const int64_t i8 = i - i % 8;
  for (int64_t r = 0; r < n; ++r) {
    float* gate = hg + r * 2 * i;
    const float* up = gate + i;
    const float w = f.weights[it.start + r];
    int64_t c = 0;
    for (; c < i8; c += 8) {
      const v8f g = load8(gate + c);
      store8(gate + c, g / (1.f + exp8(-g)) * load8(up + c) * w);
    }
    for (; c < i; ++c) gate[c] = gate[c] / (1.f + std::exp(-gate[c])) * up[c] * w;
  }
  const float* w2 = f.w2 + it.expert * f.rows(h) * i;
  if (f.packed) {
    gemm::packed_gemm<MAXR>(hg, 2 * i, w2, f.ys + it.start * h, h, n, h, i);
  } else {
    gemm::nt_gemm(hg, 2 * i, w2, i, f.ys + it.start * h, h, n, h, i);
  }
}

using SmallFn = void (*)(const Ffn&, const Item&, float*);
MOE_AVX512 void small_item_avx512(const Ffn& f, const Item& it, float* buf) {
  small_item<gemm::PR_WIDE>(f, it, buf);
}
MOE_AVX2 void small_item_avx2(const Ffn& f, const Item& it, float* buf) {
  small_item<gemm::PR>(f, it, buf);
}
void small_item_base(const Ffn& f, const Item& it, float* buf) { small_item<gemm::PR>(f, it, buf); }

}  // namespace

// x [T, H]; tokens [N] int64, rows of x grouped by expert; weights [N] (x's dtype);
// counts [El] int64 on CPU (rows of each expert, in order); w13 [El, 2I, H]; w2 [El, H, I];
// optionally the same weights packed for gemm.h ([El, 2I / 16, H, 16], [El, H / 16, I, 16],
// zero padded), which the few-row items then read instead.
// Returns [T, H]: sum over each token's pairs of weight * FFN_e(x[token]).
torch::Tensor routed_ffn(torch::Tensor x, torch::Tensor tokens, torch::Tensor weights,
                         torch::Tensor counts, torch::Tensor w13, torch::Tensor w2,
                         c10::optional<torch::Tensor> w13_packed,
                         c10::optional<torch::Tensor> w2_packed) {
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
  // Experts get uneven rows: threads take items one at a time from a shared counter, largest
  // first, instead of a fixed half of the list each (longest-processing-time order).
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.rows > b.rows; });
  auto w = weights.view({n, 1});
  const bool small_ok = x.scalar_type() == torch::kFloat32 && weights.is_contiguous() &&
                        tokens.is_contiguous() && w13.is_contiguous() && w2.is_contiguous() &&
                        weights.scalar_type() == torch::kFloat32;
  const bool packed = w13_packed.has_value() && w2_packed.has_value();
  if (packed) {
    const int64_t p = gemm::PACK;
    TORCH_CHECK(w13_packed->is_contiguous() && w2_packed->is_contiguous() &&
                    w13_packed->sizes() == at::IntArrayRef({el, (i2 + p - 1) / p, h, p}) &&
                    w2_packed->sizes() == at::IntArrayRef({el, (h + p - 1) / p, i, p}),
                "packed weights must be contiguous [El, 2I/16, H, 16] and [El, H/16, I, 16]");
  }
  Ffn ffn{};
  if (small_ok) {
    ffn = Ffn{x.data_ptr<float>(),
              tokens.data_ptr<int64_t>(),
              weights.data_ptr<float>(),
              packed ? w13_packed->data_ptr<float>() : w13.data_ptr<float>(),
              packed ? w2_packed->data_ptr<float>() : w2.data_ptr<float>(),
              packed,
              ys.data_ptr<float>(),
              h,
              i};
  }
  const SmallFn small_fn = pick_isa(small_item_avx512, small_item_avx2, small_item_base);
  const bool inference = c10::InferenceMode::is_enabled();
  const int64_t num_items = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // worker threads have their own grad and inference modes: take the caller's
    c10::InferenceMode inference_here(inference);
    torch::NoGradGuard no_grad_here;
    std::vector<float> buf;
    for (int64_t k = next++; k < num_items; k = next++) {
      const Item& it = items[k];
      if (small_ok && it.rows <= SMALL) {
        buf.resize(static_cast<size_t>(it.rows * (h + i2)));
        small_fn(ffn, it, buf.data());
        continue;
      }
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
  if (!small_ok || n > SUM_PAIRS) {
    out.index_add_(0, tokens, ys);
    return out;
  }
  // out[tokens[p]] += ys[p] in pair order: index_add_'s order (same sums, bit for bit) without
  // its dispatch and scatter set-up, which cost more than the sums for a decode step's pairs
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const float* y = ys.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK(tok[p] >= 0 && tok[p] < t, "a pair's token is not a row of x");
    float* dst = o + tok[p] * h;
    const float* src = y + p * h;
    for (int64_t c = 0; c < h; ++c) dst[c] += src[c];
  }
  return out;
}
