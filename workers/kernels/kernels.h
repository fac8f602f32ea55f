// The C++ CPU kernels of workers/kernels, bound to Python in ops.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

torch::Tensor routed_ffn(torch::Tensor x, torch::Tensor tokens, torch::Tensor weights,
                         torch::Tensor counts, torch::Tensor w13, torch::Tensor w2,
                         c10::optional<torch::Tensor> w13_packed,
                         c10::optional<torch::Tensor> w2_packed);

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor cache,
                                     torch::Tensor context_slots, torch::Tensor context_lens,
                                     int64_t num_kv_heads, int64_t k_offset,
                                     int64_t k_head_stride, int64_t v_offset,
                                     int64_t v_head_stride, int64_t v_dim, double scale);

torch::Tensor linear(torch::Tensor x, torch::Tensor packed, int64_t n,
                     c10::optional<torch::Tensor> bias);

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);

std::tuple<torch::Tensor, torch::Tensor> softmax_topk(torch::Tensor logits, int64_t k,
                                                      bool renormalize);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_pairs(torch::Tensor ids,
                                                                    torch::Tensor weights,
                                                                    torch::Tensor expert_map,
                                                                    int64_t num_local);

std::tuple<torch::Tensor, torch::Tensor> greedy_rows(torch::Tensor logits);

void rope_qk(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin,
             c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
             double eps, c10::optional<torch::Tensor> cache, c10::optional<torch::Tensor> slots,
             c10::optional<torch::Tensor> v);

std::tuple<torch::Tensor, torch::Tensor> ep_plan(torch::Tensor ids, torch::Tensor expert_to_rank,
                                                 int64_t world);
void ep_pack(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor rows,
             torch::Tensor out);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ep_unpack(
    torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor own,
    std::vector<torch::Tensor> messages, std::vector<int64_t> counts, torch::Tensor recv_x_out);
torch::Tensor ep_combine(torch::Tensor own, std::vector<c10::optional<torch::Tensor>> parts,
                         torch::Tensor send_token, std::vector<int64_t> send_splits, int64_t me,
                         int64_t num_tokens);

std::tuple<double, int64_t> fma_peak(int64_t iters);

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                torch::Tensor starts, torch::Tensor news, torch::Tensor ctxs,
                                double scale);

// Instruction sets: each kernel's inner function is written once (MOE_INLINE, no target) and
// wrapped three times, with MOE_AVX512, MOE_AVX2 and no attribute, so GCC compiles the inlined
// loops for that set; callers pick the wrapper once per call with cpu_isa(). (GCC's
// target_clones("avx2,fma") would make separate avx2 and fma clones, neither with both.)
enum class Isa { kBase, kAvx2, kAvx512 };
Isa cpu_isa();  // detected once (ops.cpp); MOE_ISA=base|avx2 caps it (tests, benchmarks)

#define MOE_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_AVX2 __attribute__((target("avx2,fma")))
#define MOE_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#else
#define MOE_AVX2
#define MOE_AVX512
#endif

// The three wrappers of one inner function: name_avx512, name_avx2 and name_base, each
// `void name_X params { inner args; }`; pick_isa chooses one for this CPU.
#define MOE_ISA_VARIANTS(name, inner, params, args) \
  MOE_AVX512 void name##_avx512 params { inner args; } \
  MOE_AVX2 void name##_avx2 params { inner args; } \
  void name##_base params { inner args; }

// Items [0, n) taken one at a time from a shared counter by the intra-op threads, each thread
// with its own scratch (`Scratch()`, passed to every item it runs). at::parallel_for splits a
// range statically: a thread descheduled mid-region (another process on the same cores: the
// router, the other stage) holds back its whole share while its peers wait; here the others take
// over the rest and only the item in hand is late.
template <typename Scratch, typename F>
void parallel_items(int64_t n, const F& item) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch{};
    for (int64_t k = next++; k < n; k = next++) item(k, scratch);
  });
}

template <typename F>
F pick_isa(F avx512, F avx2, F base) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return base;
  }
}

// 8 floats: GCC vector extensions (one ymm with AVX2, two xmm on baseline x86-64).
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));  // unaligned access
MOE_INLINE v8f load8(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
MOE_INLINE void store8(float* p, v8f v) { *reinterpret_cast<v8f_u*>(p) = v; }
MOE_INLINE float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// e^x = 2^n e^r for 8 floats given n = round(x / ln 2) as whole floats (|r| <= ln 2 / 2):
// Cephes expf's reduction by ln 2 in two parts, degree-5 polynomial, 2^n through the exponent
// bits. The tail of exp8 below and of prefill.cpp's exp8_nonpositive.
MOE_INLINE v8f exp8_scaled(v8f x, v8f n) {
  typedef int32_t v8i __attribute__((vector_size(32)));
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8f y = 1.9875691500E-4f * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.f;
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return y * reinterpret_cast<const v8f&>(bits);
}

// e^x for 8 floats (Cephes expf: range reduction by ln 2 in two parts, degree-5 polynomial,
// 2^n through the exponent bits); relative error ~1e-7 over [-87, 88], 0 below.
MOE_INLINE v8f exp8(v8f x) {
  typedef int32_t v8i __attribute__((vector_size(32)));
  const v8f hi = v8f{} + 88.3762626647949f, lo = v8f{} - 87.3365447504f;
  const v8i under = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  v8f t = x * 1.44269504088896341f + 0.5f;
  v8f n = __builtin_convertvector(__builtin_convertvector(t, v8i), v8f);  // truncates
  n = n > t ? n - 1.f : n;                                                  // floor
  return under ? v8f{} : exp8_scaled(x, n);
}

// One RMSNorm row, y = w * x / sqrt(mean(x^2) + eps) with fp32 statistics (transformers'
// formula); y may be x (in place: each element is read before it is written).
MOE_INLINE void rms_norm_row(const float* x, const float* w, float* y, int64_t d, float eps) {
  const int64_t d8 = d - d % 8;
  v8f acc{};
  for (int64_t c = 0; c < d8; c += 8) {
    const v8f v = load8(x + c);
    acc += v * v;
  }
  float ss = hsum8(acc);
  for (int64_t c = d8; c < d; ++c) ss += x[c] * x[c];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t c = 0; c < d8; c += 8) store8(y + c, load8(w + c) * (load8(x + c) * inv));
  for (int64_t c = d8; c < d; ++c) y[c] = w[c] * (x[c] * inv);
}
