// Small-M matrix products for CPU, inlined into each instruction-set wrapper (kernels.h).
//
// nt_gemm: C[M, N] = A[M, K] · W[N, K]^T, W in torch's Linear layout (one row per output
// feature, K contiguous), no packing. A tile of MR rows x NR outputs keeps MR*NR 8-wide
// accumulators in registers and walks K once: each step loads MR rows of A and NR rows of W
// and does MR*NR fused multiply-adds. The NR rows of W (NR * K * 4 bytes) stay in L1 while
// the M rows pass over them, so W, the large operand, is read from memory once. Meant for the
// few rows per expert of a decode step (MKL/oneDNN, tuned for large M, win above ~32 rows).
#pragma once

#include "kernels.h"

namespace gemm {

constexpr int MR = 2, NR = 6;  // 12 accumulators + 2 A + 1 W = 15 of 16 ymm registers

template <int R, int C>
MOE_INLINE void tile(const float* a, int64_t lda, const float* w, int64_t ldw, float* c,
                     int64_t ldc, int64_t k) {
  v8f acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = v8f{};
  const int64_t k8 = k - k % 8;
  for (int64_t p = 0; p < k8; p += 8) {
    v8f av[R];
    for (int r = 0; r < R; ++r) av[r] = load8(a + r * lda + p);
    for (int j = 0; j < C; ++j) {
      const v8f wv = load8(w + j * ldw + p);
      for (int r = 0; r < R; ++r) acc[r][j] += av[r] * wv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) {
      float s = hsum8(acc[r][j]);
      for (int64_t p = k8; p < k; ++p) s += a[r * lda + p] * w[j * ldw + p];
      c[r * ldc + j] = s;
    }
}

template <int C>
MOE_INLINE void column_panel(const float* a, int64_t lda, const float* w, int64_t ldw, float* c,
                             int64_t ldc, int64_t m, int64_t k) {
  int64_t r = 0;
  for (; r + MR <= m; r += MR) tile<MR, C>(a + r * lda, lda, w, ldw, c + r * ldc, ldc, k);
  if (r < m) tile<1, C>(a + r * lda, lda, w, ldw, c + r * ldc, ldc, k);  // MR = 2: one left
}

// a [M, K] (row stride lda), w [N, K] (ldw), c [M, N] (ldc).
MOE_INLINE void nt_gemm(const float* a, int64_t lda, const float* w, int64_t ldw, float* c,
                        int64_t ldc, int64_t m, int64_t n, int64_t k) {
  int64_t j = 0;
  for (; j + NR <= n; j += NR) column_panel<NR>(a, lda, w + j * ldw, ldw, c + j, ldc, m, k);
  for (; j < n; ++j) column_panel<1>(a, lda, w + j * ldw, ldw, c + j, ldc, m, k);
}

}  // namespace gemm
