// The step of GQA attention between the projections and the attention itself, in one pass per
// token: optional per-head RMSNorm of q and k (Qwen3's q_norm / k_norm, fp32 statistics as
// transformers), NeoX rotary embedding (halves rotated: x * cos + rotate_half(x) * sin), in
// place, and the token's rotated key and its value written to its cache row. In torch that is
// ~20 ops per layer (two norms, two rotaries of five ops each, a stack, an index_copy), each a
// pass over the tensors and, for a decode step's few rows, mostly dispatch.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace {

constexpr int64_t GRAIN = 64;  // tokens per thread chunk: a decode step stays on one thread

struct Rope {
  float* q;          // [T, Hq, D]
  float* k;          // [T, Hkv, D]
  const float* v;    // [T, Hkv, D] or null (no cache write)
  const float* cos;  // [T, D]
  const float* sin;  // [T, D]
  const float* qw;   // [D] or null (no norm)
  const float* kw;   // [D] or null
  float* cache;      // [S, 2, Hkv, D] or null
  const int64_t* slots;  // [T]
  int64_t hq, hkv, d;
  float eps;
};

// x[i] = x[i] cos[i] - x[i + h] sin[i]; x[i + h] = x[i + h] cos[i + h] + x[i] sin[i + h].
MOE_INLINE void rotate_row(float* x, const float* c, const float* s, int64_t d) {
  const int64_t h = d / 2, h8 = h - h % 8;
  for (int64_t i = 0; i < h8; i += 8) {
    const v8f a = load8(x + i), b = load8(x + h + i);
    store8(x + i, a * load8(c + i) - b * load8(s + i));
    store8(x + h + i, b * load8(c + h + i) + a * load8(s + h + i));
  }
  for (int64_t i = h8; i < h; ++i) {
    const float a = x[i], b = x[h + i];
    x[i] = a * c[i] - b * s[i];
    x[h + i] = b * c[h + i] + a * s[h + i];
  }
}

MOE_INLINE void rope_tokens(const Rope& r, int64_t lo, int64_t hi) {
  const int64_t d = r.d, kv_row = r.hkv * d;
  for (int64_t t = lo; t < hi; ++t) {
    const float* c = r.cos + t * d;
    const float* s = r.sin + t * d;
    for (int64_t h = 0; h < r.hq; ++h) {
      float* x = r.q + (t * r.hq + h) * d;
      if (r.qw != nullptr) rms_norm_row(x, r.qw, x, d, r.eps);
      rotate_row(x, c, s, d);
    }
    float* kt = r.k + t * kv_row;
    for (int64_t h = 0; h < r.hkv; ++h) {
      if (r.kw != nullptr) rms_norm_row(kt + h * d, r.kw, kt + h * d, d, r.eps);
      rotate_row(kt + h * d, c, s, d);
    }
    if (r.cache != nullptr) {  // cache row [2, Hkv, D]: key, then value
      float* row = r.cache + r.slots[t] * 2 * kv_row;
      std::memcpy(row, kt, kv_row * sizeof(float));
      std::memcpy(row + kv_row, r.v + t * kv_row, kv_row * sizeof(float));
    }
  }
}

using RopeFn = void (*)(const Rope&, int64_t, int64_t);
MOE_ISA_VARIANTS(rope, rope_tokens, (const Rope& r, int64_t lo, int64_t hi), (r, lo, hi))

const float* optional_ptr(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

}  // namespace

// q [T, Hq, D], k [T, Hkv, D] fp32 contiguous, changed in place; cos, sin [T, D] fp32
// contiguous; q_norm, k_norm [D] or None; with cache [S, 2, Hkv, D] fp32 contiguous, slots [T]
// int64 and v [T, Hkv, D]: cache[slots[t]] = (rotated k[t], v[t]).
void rope_qk(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin,
             c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
             double eps, c10::optional<torch::Tensor> cache, c10::optional<torch::Tensor> slots,
             c10::optional<torch::Tensor> v) {
  const auto f32 = [](const torch::Tensor& t) {
    return t.scalar_type() == torch::kFloat32 && t.is_contiguous();
  };
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && f32(q) && f32(k) && f32(cos) && f32(sin),
              "q [T, Hq, D], k [T, Hkv, D], cos and sin [T, D] must be contiguous fp32");
  const int64_t t = q.size(0), d = q.size(2);
  TORCH_CHECK(k.size(0) == t && k.size(2) == d && d % 2 == 0 && cos.numel() == t * d &&
                  sin.numel() == t * d,
              "q, k, cos and sin disagree on T or D (D must be even)");
  for (const auto* w : {&q_norm, &k_norm}) {
    TORCH_CHECK(!w->has_value() || !(*w)->defined() || (f32(**w) && (*w)->numel() == d),
                "q_norm and k_norm must be fp32 [D]");
  }
  const bool write = cache.has_value() && cache->defined();
  if (write) {
    TORCH_CHECK(f32(*cache) && cache->numel() % (2 * k.size(1) * d) == 0 && slots.has_value() &&
                    slots->scalar_type() == torch::kInt64 && slots->is_contiguous() &&
                    slots->numel() == t && v.has_value() && f32(*v) && v->sizes() == k.sizes(),
                "cache [S, 2, Hkv, D] fp32, slots [T] int64 and v shaped like k are needed");
  }
  const Rope r{q.data_ptr<float>(),
               k.data_ptr<float>(),
               write ? v->data_ptr<float>() : nullptr,
               cos.data_ptr<float>(),
               sin.data_ptr<float>(),
               optional_ptr(q_norm),
               optional_ptr(k_norm),
               write ? cache->data_ptr<float>() : nullptr,
               write ? slots->data_ptr<int64_t>() : nullptr,
               q.size(1),
               k.size(1),
               d,
               static_cast<float>(eps)};
  const RopeFn fn = pick_isa(rope_avx512, rope_avx2, rope_base);
  at::parallel_for(0, t, GRAIN, [&](int64_t lo, int64_t hi) { fn(r, lo, hi); });
}
