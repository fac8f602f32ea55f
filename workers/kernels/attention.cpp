// Paged decode attention: one query token per sequence, K and V read in place from the paged
// cache (no gather of each context into a padded copy, no mask).
//
// Legend: B sequences, Hq query heads, Hkv KV heads, G = Hq / Hkv, Dk key dim, Dv value dim,
// L a sequence's context length, S cache slots. The cache is [S, row] with one row per token;
// within a row, KV head h's key starts at k_offset + h * k_head_stride and its value at
// v_offset + h * v_head_stride (GQA: [2, Hkv, D] -> k 0 / D, v Hkv*D / D; MLA's latent cache
// [C + R]: one head, k 0 with Dk = C + R, v 0 with Dv = C).
// Work items are sequences over the intra-op threads (each one's KV heads in turn: a token's
// heads sit side by side in its cache row, so a thread walks one sequence's rows while they
// are fresh; 15% faster than (sequence, KV head) items on cold caches); per KV head its G
// query heads' scores over the context, a softmax (exponentials 8 at a time), and the weighted
// sum of values, in fp32, one walk over the values for all G heads when G is 2 or 4 (the two
// together ~12% faster on bench/decode_attention.py's GQA shape).
// The item function is compiled for AVX-512, AVX2+FMA and baseline x86-64 (kernels.h) and
// picked once per call from the CPU's instruction set.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Layout {
  const float* q;       // [B, Hq, Dk]
  const float* cache;   // [S, row]
  const int64_t* slots; // [B, Lmax]
  const int64_t* lens;  // [B]
  float* out;           // [B, Hq, Dv]
  int64_t hq, hkv, g, dk, dv, lmax, row, k_offset, k_head_stride, v_offset, v_head_stride;
  float scale;
};

const float* key_row(const Layout& a, int64_t slot, int64_t h) {
  return a.cache + slot * a.row + a.k_offset + h * a.k_head_stride;
}

const float* value_row(const Layout& a, int64_t slot, int64_t h) {
  return a.cache + slot * a.row + a.v_offset + h * a.v_head_stride;
}

// Ask for a row's cache lines ahead of use: context rows sit at scattered slots, so the
// hardware prefetcher cannot see them coming.
MOE_INLINE void prefetch_row(const float* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(row + i);
}

constexpr int64_t AHEAD = 8;  // rows prefetched ahead

// One (sequence, KV head) item: its G query heads' scores over the context, four key rows at a
// time, each read once for all G heads while it sits in L1 (MLA: G = every query head over one
// 576-float latent row); softmax; then the weighted sum of values, per head, with the output
// block held in registers across the context.
// q . k, summed as each lane of dot4 is (the context's last len % 4 rows).
MOE_INLINE float dot1(const float* q, const float* k, int64_t dk) {
  const int64_t dk8 = dk - dk % 8;
  v8f c{};
  for (int64_t i = 0; i < dk8; i += 8) c += load8(q + i) * load8(k + i);
  float d = hsum8(c);
  for (int64_t i = dk8; i < dk; ++i) d += q[i] * k[i];
  return d;
}

MOE_INLINE void dot4(const float* q, const float* k0, const float* k1, const float* k2,
                     const float* k3, int64_t dk, float scale, float* out) {
  const int64_t dk8 = dk - dk % 8;
  v8f c0{}, c1{}, c2{}, c3{};
  for (int64_t i = 0; i < dk8; i += 8) {
    const v8f qv = load8(q + i);
    c0 += qv * load8(k0 + i);
    c1 += qv * load8(k1 + i);
    c2 += qv * load8(k2 + i);
    c3 += qv * load8(k3 + i);
  }
  float d0 = hsum8(c0), d1 = hsum8(c1), d2 = hsum8(c2), d3 = hsum8(c3);
  for (int64_t i = dk8; i < dk; ++i) {
    d0 += q[i] * k0[i];
    d1 += q[i] * k1[i];
    d2 += q[i] * k2[i];
    d3 += q[i] * k3[i];
  }
  out[0] = d0 * scale;
  out[1] = d1 * scale;
  out[2] = d2 * scale;
  out[3] = d3 * scale;
}

// o[Dv block of U * 8] = sum over the context of w * value block (registers across it).
template <int U>
MOE_INLINE void value_block(const Layout& a, const int64_t* sl, int64_t len, int64_t h,
                            const float* w, int64_t c, float* o) {
  v8f acc[U] = {};
  for (int64_t p = 0; p < len; ++p) {
    const float* v = value_row(a, sl[p], h) + c;
    if (p + AHEAD < len) prefetch_row(value_row(a, sl[p + AHEAD], h) + c, U * 8);
    for (int u = 0; u < U; ++u) acc[u] += w[p] * load8(v + 8 * u);
  }
  for (int u = 0; u < U; ++u) store8(o + c + 8 * u, acc[u]);
}

// One head's output o [Dv] in blocks of 64 (8 registers), then of 8, then single values.
MOE_INLINE void values(const Layout& a, const int64_t* sl, int64_t len, int64_t h,
                       const float* w, float* o) {
  const int64_t dv = a.dv;
  int64_t c = 0;
  for (; c + 64 <= dv; c += 64) value_block<8>(a, sl, len, h, w, c, o);
  for (; c + 8 <= dv; c += 8) value_block<1>(a, sl, len, h, w, c, o);
  for (; c < dv; ++c) {
    float acc = 0.f;
    for (int64_t p = 0; p < len; ++p) acc += w[p] * value_row(a, sl[p], h)[c];
    o[c] = acc;
  }
}

// s [len] scores -> their softmax in place: the exponentials 8 at a time (exp8, relative error
// ~1e-7), the sum in fp32.
MOE_INLINE void softmax_row(float* s, int64_t len) {
  const int64_t l8 = len - len % 8;
  float mx = s[0];
  for (int64_t q = 1; q < len; ++q) mx = std::max(mx, s[q]);
  const v8f m = v8f{} + mx;
  v8f acc{};
  for (int64_t q = 0; q < l8; q += 8) {
    const v8f e = exp8(load8(s + q) - m);
    store8(s + q, e);
    acc += e;
  }
  float sum = hsum8(acc);
  for (int64_t q = l8; q < len; ++q) sum += (s[q] = std::exp(s[q] - mx));
  const float inv = 1.f / sum;
  for (int64_t q = 0; q < len; ++q) s[q] *= inv;
}

// G query heads sharing KV head h (GQA), o [G, Dv]: one walk over the value rows per block of
// U * 8 columns serves all G heads (G * U accumulators in registers), instead of one per head.
// w [G, len]: each head's softmax weights.
template <int G, int U>
MOE_INLINE void value_heads(const Layout& a, const int64_t* sl, int64_t len, int64_t h,
                            const float* w, float* o) {
  for (int64_t c = 0; c < a.dv; c += U * 8) {
    v8f acc[G][U] = {};
    for (int64_t p = 0; p < len; ++p) {
      const float* v = value_row(a, sl[p], h) + c;
      if (p + AHEAD < len) prefetch_row(value_row(a, sl[p + AHEAD], h) + c, U * 8);
      for (int u = 0; u < U; ++u) {
        const v8f x = load8(v + 8 * u);
        for (int j = 0; j < G; ++j) acc[j][u] += w[j * len + p] * x;
      }
    }
    for (int j = 0; j < G; ++j) {
      for (int u = 0; u < U; ++u) store8(o + j * a.dv + c + 8 * u, acc[j][u]);
    }
  }
}

MOE_INLINE void attend_item(const Layout& a, int64_t s, int64_t h, float* scores) {
  const int64_t len = a.lens[s], g = a.g, dk = a.dk, dv = a.dv;
  const int64_t* sl = a.slots + s * a.lmax;
  const float* q0 = a.q + (s * a.hq + h * g) * dk;  // the item's G query heads, [G, Dk]
  float* o0 = a.out + (s * a.hq + h * g) * dv;      // [G, Dv]
  int64_t p = 0;
  for (; p + 4 <= len; p += 4) {
    const float* k0 = key_row(a, sl[p], h);
    const float* k1 = key_row(a, sl[p + 1], h);
    const float* k2 = key_row(a, sl[p + 2], h);
    const float* k3 = key_row(a, sl[p + 3], h);
    for (int64_t f = p + AHEAD; f < std::min(p + AHEAD + 4, len); ++f) {
      prefetch_row(key_row(a, sl[f], h), dk);
    }
    for (int64_t j = 0; j < g; ++j) {
      dot4(q0 + j * dk, k0, k1, k2, k3, dk, a.scale, scores + j * len + p);
    }
  }
  for (; p < len; ++p) {
    const float* k = key_row(a, sl[p], h);
    for (int64_t j = 0; j < g; ++j) scores[j * len + p] = dot1(q0 + j * dk, k, dk) * a.scale;
  }
  for (int64_t j = 0; j < g; ++j) softmax_row(scores + j * len, len);
  if (g == 2 && dv % 64 == 0) return value_heads<2, 8>(a, sl, len, h, scores, o0);
  if (g == 4 && dv % 32 == 0) return value_heads<4, 4>(a, sl, len, h, scores, o0);
  for (int64_t j = 0; j < g; ++j) values(a, sl, len, h, scores + j * len, o0 + j * dv);
}

using ItemFn = void (*)(const Layout&, int64_t, int64_t, float*);
MOE_ISA_VARIANTS(attend, attend_item, (const Layout& a, int64_t s, int64_t h, float* sc),
                 (a, s, h, sc))

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
  auto out = torch::empty({b, hq, v_dim}, q.options());
  const Layout lay{q.data_ptr<float>(), cache.data_ptr<float>(), context_slots.data_ptr<int64_t>(),
                   lens.data_ptr<int64_t>(), out.data_ptr<float>(), hq, hkv, g, dk, v_dim, lmax,
                   row, k_offset, k_head_stride, v_offset, v_head_stride,
                   static_cast<float>(scale)};
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < b; ++s) {
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= lmax, "context length out of range");
  }
  const ItemFn item_fn = pick_isa(attend_avx512, attend_avx2, attend_base);
  const size_t need = static_cast<size_t>(g * lmax);
  parallel_items<std::vector<float>>(b, [&](int64_t s, std::vector<float>& scores) {
    if (scores.size() < need) scores.resize(need);
    for (int64_t h = 0; h < hkv; ++h) item_fn(lay, s, h, scores.data());
  });
  return out;
}
