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

#include <algorithm>

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
    if ((p & 15) == 0) {  // one line of each W row, 1 KB ahead (a cold W streams from memory)
      for (int j = 0; j < C; ++j) __builtin_prefetch(w + j * ldw + p + 256);
    }
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

// Packed panels: W [N, K] stored as [ceil(N / 16), K, 16] (column panels of 16 outputs, zero
// padded), so one panel is a single sequential stream of K * 64 bytes: with few rows the
// product is bound by W's traffic, and one stream per panel keeps the hardware prefetcher
// ahead where 16 separate row streams did not (1.3-1.5x at 4-16 rows on cold weights).
// A tile of R rows x 16 outputs: per k, two loads of W and R broadcasts of A feed 2R FMAs.
// Most rows per tile: 6 with 16 vector registers (12 accumulators + 2 W + 1 broadcast), 12 with
// AVX-512's 32 (24 + 3; AVX-512VL gives the 8-wide vectors the upper 16 registers too).
constexpr int PACK = 16, PR = 6, PR_WIDE = 12;

template <int R>
MOE_INLINE void packed_tile(const float* a, int64_t lda, const float* wp, float* c, int64_t ldc,
                            int64_t k, int64_t cols) {
  v8f acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v8f{};
  for (int64_t p = 0; p < k; ++p) {
    __builtin_prefetch(wp + (p + 64) * PACK);
    const v8f w0 = load8(wp + p * PACK), w1 = load8(wp + p * PACK + 8);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * lda + p];
      acc[r][0] += s * w0;
      acc[r][1] += s * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    if (cols == PACK) {
      store8(c + r * ldc, acc[r][0]);
      store8(c + r * ldc + 8, acc[r][1]);
    } else {
      for (int64_t j = 0; j < cols; ++j) c[r * ldc + j] = j < 8 ? acc[r][0][j] : acc[r][1][j - 8];
    }
  }
}

// packed_tile<m> for a run-time m in [1, R].
template <int R>
MOE_INLINE void packed_rows(const float* a, int64_t lda, const float* wp, float* c, int64_t ldc,
                            int64_t m, int64_t k, int64_t cols) {
  if constexpr (R > 0) {
    if (m == R) {
      packed_tile<R>(a, lda, wp, c, ldc, k, cols);
    } else {
      packed_rows<R - 1>(a, lda, wp, c, ldc, m, k, cols);
    }
  }
}

// a [M, K] (lda), wp [ceil(N / 16), K, 16] (packed W), c [M, N] (ldc). The M rows are cut in
// equal tiles of at most MAXR (8 rows: one tile of 8 with 32 registers, 4 + 4 with 16, not
// 6 + 2, whose 2-row pass waits on its 4 accumulators' FMA latency).
template <int MAXR>
MOE_INLINE void packed_gemm(const float* a, int64_t lda, const float* wp, float* c, int64_t ldc,
                            int64_t m, int64_t n, int64_t k) {
  const int64_t tiles = (m + MAXR - 1) / MAXR;
  const int64_t per = tiles ? (m + tiles - 1) / tiles : 0;
  for (int64_t q = 0; q * PACK < n; ++q) {
    const float* w = wp + q * k * PACK;
    float* cq = c + q * PACK;
    const int64_t cols = std::min<int64_t>(PACK, n - q * PACK);
    for (int64_t r = 0; r < m; r += per) {
      packed_rows<MAXR>(a + r * lda, lda, w, cq + r * ldc, ldc, std::min(per, m - r), k, cols);
    }
  }
}

}  // namespace gemm
