// Paged decode attention: one query token per sequence, K and V read in place from the paged
// cache (no gather of each context into a padded copy, no mask).
//
// Legend: B sequences, Hq query heads, Hkv KV heads, G = Hq / Hkv, Dk key dim, Dv value dim,
// L a sequence's context length, S cache slots. The cache is [S, row] with one row per token;
// within a row, KV head h's key starts at k_offset + h * k_head_stride and its value at
// v_offset + h * v_head_stride (GQA: [2, Hkv, D] -> k 0 / D, v Hkv*D / D; MLA's latent cache
// [C + R]: one head, k 0 with Dk = C + R, v 0 with Dv = C).
// Work items are (sequence, KV head) pairs over the intra-op threads; each computes its G
// heads' scores over the context, a softmax, and the weighted sum of values, in fp32.
// The dot and axpy loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, and the
// loader picks the best the CPU has at run time (GCC target_clones).

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define MOE_CLONES
#endif

MOE_CLONES float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

MOE_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

// q [B, Hq, Dk] fp32; cache [S, row] fp32 (any trailing shape, contiguous); context_slots
// [B, Lmax] int64 (slot of each position; pad beyond the length); context_lens [B] int64.
// Returns [B, Hq, Dv].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor cache,
                                     torch::Tensor context_slots, torch::Tensor context_lens,
                                     int64_t num_kv_heads, int64_t k_offset,
                                     int64_t k_head_stride, int64_t v_offset,
                                     int64_t v_head_stride, int64_t v_dim, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32, "q must be fp32 [B, Hq, Dk]");
  TORCH_CHECK(cache.scalar_type() == torch::kFloat32 && cache.is_contiguous(),
              "cache must be a contiguous fp32 tensor");
  TORCH_CHECK(context_slots.scalar_type() == torch::kInt64 && context_slots.dim() == 2,
              "context_slots must be int64 [B, L]");
  q = q.contiguous();
  context_slots = context_slots.contiguous();
  auto lens = context_lens.to(torch::kInt64).contiguous();
  const int64_t b = q.size(0), hq = q.size(1), dk = q.size(2), hkv = num_kv_heads;
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "query heads must be a multiple of KV heads");
  const int64_t g = hq / hkv, lmax = context_slots.size(1);
  const int64_t row = cache.numel() / std::max<int64_t>(cache.size(0), 1);
  TORCH_CHECK(k_offset + (hkv - 1) * k_head_stride + dk <= row &&
                  v_offset + (hkv - 1) * v_head_stride + v_dim <= row,
              "the K/V layout does not fit in a cache row");
  auto out = torch::zeros({b, hq, v_dim}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* cp = cache.data_ptr<float>();
  const int64_t* slots = context_slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b * hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t s = item / hkv, h = item % hkv, len = lp[s];
      TORCH_CHECK(len >= 1 && len <= lmax, "context length out of range");
      scores.assign(static_cast<size_t>(g * len), 0.f);
      const int64_t* sl = slots + s * lmax;
      const float* q0 = qp + (s * hq + h * g) * dk;  // the item's G query heads, [G, Dk]
      float* o0 = op + (s * hq + h * g) * v_dim;      // [G, Dv]
      for (int64_t p = 0; p < len; ++p) {  // each key row read once for the G heads
        const float* k = cp + sl[p] * row + k_offset + h * k_head_stride;
        for (int64_t j = 0; j < g; ++j) scores[j * len + p] = dot(q0 + j * dk, k, dk) * sc;
      }
      for (int64_t j = 0; j < g; ++j) {
        float* sj = scores.data() + j * len;
        const float mx = *std::max_element(sj, sj + len);
        float sum = 0.f;
        for (int64_t p = 0; p < len; ++p) {
          sj[p] = std::exp(sj[p] - mx);
          sum += sj[p];
        }
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < len; ++p) sj[p] *= inv;
      }
      for (int64_t p = 0; p < len; ++p) {  // each value row read once for the G heads
        const float* v = cp + sl[p] * row + v_offset + h * v_head_stride;
        for (int64_t j = 0; j < g; ++j) axpy(scores[j * len + p], v, o0 + j * v_dim, v_dim);
      }
    }
  });
  return out;
}
