// fma_peak: this CPU's fp32 multiply-add throughput, the ceiling no fp32 kernel can pass
// (`bench/long_prefill.py` sets its floor by it). Each intra-op thread runs independent
// chains of vector multiply-adds on registers, with no memory traffic: on AVX-512 16-wide
// vectors, on AVX2 8-wide, on baseline x86-64 8-wide as two SSE halves (multiply, then add).
#include "kernels.h"

#include <chrono>

namespace {

typedef float v16f __attribute__((vector_size(64)));

// `chains` accumulators, each `iters` multiply-adds of V; returns their sum (so nothing is
// optimised away).
template <typename V, int kChains>
MOE_INLINE float chains_of(int64_t iters) {
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = V{} + 0.001f * c;
  const V mul = V{} + 0.999999f, add = V{} + 1e-7f;
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * mul + add;
  }
  float s = 0.f;
  for (int c = 0; c < kChains; ++c)
    for (size_t j = 0; j < sizeof(V) / sizeof(float); ++j) s += acc[c][j];
  return s;
}

// 12 chains: enough in flight to cover the multiply-add latency (4 cycles) on 2-3 ports.
MOE_AVX512 float chains_avx512(int64_t iters) { return chains_of<v16f, 12>(iters); }
MOE_AVX2 float chains_avx2(int64_t iters) { return chains_of<v8f, 12>(iters); }
float chains_base(int64_t iters) { return chains_of<v8f, 6>(iters); }

}  // namespace

// -> (GFLOP/s over every intra-op thread, vector width in floats)
std::tuple<double, int64_t> fma_peak(int64_t iters) {
  const auto run = pick_isa(chains_avx512, chains_avx2, chains_base);
  const int64_t width = cpu_isa() == Isa::kAvx512 ? 16 : 8;
  const int64_t chains = cpu_isa() == Isa::kBase ? 6 : 12;
  const int64_t threads = at::get_num_threads();
  std::vector<float> sums(threads);  // kept, so the chains are not optimised away
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) sums[t] = run(iters);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flops = 2.0 * static_cast<double>(threads * iters * chains * width);
  static volatile float kept;
  kept = sums[0];
  return {flops / s / 1e9, width};
}
