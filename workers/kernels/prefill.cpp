// Prefill attention: each sequence's new queries over its context (cached + new keys), causal,
// in fp32, without a mask tensor and without SDPA's requirement that V be as wide as K.
//
// Legend: b sequences, T the step's query rows, Hq query heads, Hkv KV heads, G = Hq / Hkv,
// D the key width, Dv the value width, L a sequence's context (its new tokens are its last
// ones: query t of n new sits at position L - n + t and sees keys 0 .. L - n + t).
// Flash-style (online softmax): a work item is (sequence, KV head, block of BQ positions), its
// M = G x BQ query rows (the G heads that read the KV head, so each key and value is loaded once
// for all of them) walk the keys they can see in blocks of NB: scores S = Q K^T in a tile of R
// rows x 16 keys (K packed once per call in panels of 16 keys, [D][16], as `linear`'s weights),
// the causal cut on the diagonal blocks, the running max and sum per row, exponentials 8 at a
// time (of arguments <= 0 only: a leaner e^x), then O += P V in tiles of R rows x 16 value
// columns (V read in place: each value row's 16 columns are contiguous). Items are taken latest
// block first from a shared counter.
// Measured against torch's CPU flash kernel (SDPA) on 2 threads of an AVX-512 EPYC, 8 query /
// 4 KV heads of 64: 2,048 causal 26-28 ms vs 39-42; 952 new over 3,000: 30-32 vs 45-53; MLA's
// expanded 96/64 (SDPA needs V padded to 96): 34-39 vs 49-60 (`python -m
// bench.prefill_attention`).
#include "kernels.h"

#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t NB = 128;   // keys per block: S is M x NB floats, 24 KB at M = 48
constexpr int64_t MAXM = 48;  // query rows per item

struct Args {
  const float* q;  // [T, Hq, D]
  int64_t q_row, q_head;
  const float* kp;  // K packed: [b, Hkv, lpad / 16, D, 16]
  int64_t lpad;
  const float* v;  // [b, Lmax, Hkv, Dv]
  int64_t v_seq, v_row, v_head;
  float* out;  // [n, Hq, Dv]: each sequence's new tokens in turn
  const int64_t *starts, *news, *ctxs, *out_starts;  // [b]
  int64_t hkv, g, d, dv, bq;
  float scale;
};

struct Scratch {
  std::vector<float> qs, s, o, mx, l;
};

// acc[R rows][16] += A[R, k] . B[k, 16] (A's rows lda apart, B's rows ldb apart): the loop of
// both tiles below
template <int R>
MOE_INLINE void mac16(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k,
                      v8f (&acc)[R][2]) {
  for (int64_t p = 0; p < k; ++p) {
    const v8f w0 = load8(b + p * ldb), w1 = load8(b + p * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * lda + p];
      acc[r][0] += x * w0;
      acc[r][1] += x * w1;
    }
  }
}

// S[R, 16] = Qs[R, D] . (16 keys of a panel [D][16])^T
template <int R>
MOE_INLINE void qk_tile(const float* qs, int64_t d, const float* panel, float* s) {
  v8f acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v8f{};
  mac16<R>(qs, d, panel, 16, d, acc);
  for (int r = 0; r < R; ++r) {
    store8(s + r * NB, acc[r][0]);
    store8(s + r * NB + 8, acc[r][1]);
  }
}

// O[R, 16] += P[R, nk] . V[nk, 16] (value rows ldv apart)
template <int R>
MOE_INLINE void pv_tile(const float* p, const float* v, int64_t ldv, int64_t nk, float* o,
                        int64_t ldo) {
  v8f acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = load8(o + r * ldo);
    acc[r][1] = load8(o + r * ldo + 8);
  }
  mac16<R>(p, NB, v, ldv, nk, acc);
  for (int r = 0; r < R; ++r) {
    store8(o + r * ldo, acc[r][0]);
    store8(o + r * ldo + 8, acc[r][1]);
  }
}

// The tiles for a run-time row count m in [1, R].
template <int R>
MOE_INLINE void qk_rows(int64_t m, const float* qs, int64_t d, const float* panel, float* s) {
  if constexpr (R > 0) {
    if (m == R) {
      qk_tile<R>(qs, d, panel, s);
    } else {
      qk_rows<R - 1>(m, qs, d, panel, s);
    }
  }
}

template <int R>
MOE_INLINE void pv_rows(int64_t m, const float* p, const float* v, int64_t ldv, int64_t nk,
                        float* o, int64_t ldo) {
  if constexpr (R > 0) {
    if (m == R) {
      pv_tile<R>(p, v, ldv, nk, o, ldo);
    } else {
      pv_rows<R - 1>(m, p, v, ldv, nk, o, ldo);
    }
  }
}

// e^x for x <= 0 (a score minus its row's running max): exp8's reduction and polynomial
// (kernels.h exp8_scaled) without what arguments <= 0 never need: no upper clamp, rounding to
// the nearest integer by adding and taking off 1.5 * 2^23 instead of a truncation and a floor,
// and below -87.3 e^-87.3 (~1e-38, nothing next to the row's 1) instead of 0. ~7% of the
// kernel's time saved.
MOE_INLINE v8f exp8_nonpositive(v8f x) {
  const v8f lo = v8f{} - 87.3365447504f, magic = v8f{} + 12582912.f;
  x = x < lo ? lo : x;
  const v8f n = (x * 1.44269504088896341f + magic) - magic;  // round(x / ln 2)
  return exp8_scaled(x, n);
}

// Softmax of one score row's first `valid` keys against the running max and sum; the row
// becomes its weights (0 past `valid`), the row's output is rescaled by the max's change.
MOE_INLINE void online_softmax(float* row, int64_t valid, int64_t width, float& mx, float& l,
                               float* o, int64_t dv) {
  const float inf = std::numeric_limits<float>::infinity();
  int64_t c = 0;
  v8f m8 = v8f{} - inf;
  for (; c + 8 <= valid; c += 8) {
    const v8f x = load8(row + c);
    m8 = x > m8 ? x : m8;
  }
  float bmax = -inf;
  for (int j = 0; j < 8; ++j) bmax = std::max(bmax, m8[j]);
  for (; c < valid; ++c) bmax = std::max(bmax, row[c]);
  const float mnew = std::max(mx, bmax);  // finite: key 0 is in every row's first block
  const float corr = std::exp(mx - mnew);  // 0 on the first block (mx = -inf)
  const v8f mv = v8f{} + mnew;
  v8f sum8{};
  for (c = 0; c + 8 <= valid; c += 8) {
    const v8f e = exp8_nonpositive(load8(row + c) - mv);
    store8(row + c, e);
    sum8 += e;
  }
  float sum = hsum8(sum8);
  for (; c < valid; ++c) {
    row[c] = std::exp(row[c] - mnew);
    sum += row[c];
  }
  for (; c < width; ++c) row[c] = 0.f;
  l = l * corr + sum;
  mx = mnew;
  if (corr != 1.f) {
    for (int64_t j = 0; j < dv; ++j) o[j] *= corr;
  }
}

// One item: sequence i, KV head h, positions q0 .. q0 + BQ of its new tokens.
template <int R>
MOE_INLINE void item(const Args& a, int64_t i, int64_t h, int64_t q0, Scratch& sc) {
  const int64_t d = a.d, dv = a.dv, g = a.g;
  const int64_t nq = std::min(a.bq, a.news[i] - q0), m = nq * g;  // rows: (position, head)
  const int64_t first = a.ctxs[i] - a.news[i] + q0;               // the first row's position
  const int64_t kend = first + nq;                                 // keys the last row sees
  float *qs = sc.qs.data(), *s = sc.s.data(), *o = sc.o.data();
  for (int64_t t = 0; t < nq; ++t) {
    for (int64_t j = 0; j < g; ++j) {
      const float* src = a.q + (a.starts[i] + q0 + t) * a.q_row + (h * g + j) * a.q_head;
      float* dst = qs + (t * g + j) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * a.scale;
    }
  }
  std::fill(sc.mx.begin(), sc.mx.begin() + m, -std::numeric_limits<float>::infinity());
  std::fill(sc.l.begin(), sc.l.begin() + m, 0.f);
  std::fill(o, o + m * dv, 0.f);
  const int64_t tiles = (m + R - 1) / R, per = (m + tiles - 1) / tiles;  // equal tiles
  const float* kp = a.kp + (i * a.hkv + h) * a.lpad * d;
  const float* v = a.v + i * a.v_seq + h * a.v_head;
  for (int64_t kb = 0; kb < kend; kb += NB) {
    const int64_t nk = std::min(NB, kend - kb), width = (nk + 15) / 16 * 16;
    for (int64_t pn = 0; pn * 16 < nk; ++pn) {
      for (int64_t r = 0; r < m; r += per) {
        qk_rows<R>(std::min(per, m - r), qs + r * d, d, kp + (kb + pn * 16) * d,
                   s + r * NB + pn * 16);
      }
    }
    for (int64_t r = 0; r < m; ++r) {
      const int64_t valid = std::min(nk, first + r / g + 1 - kb);  // the causal cut
      online_softmax(s + r * NB, std::max<int64_t>(valid, 0), width, sc.mx[r], sc.l[r],
                     o + r * dv, dv);
    }
    for (int64_t j = 0; j < dv; j += 16) {
      for (int64_t r = 0; r < m; r += per) {
        pv_rows<R>(std::min(per, m - r), s + r * NB, v + kb * a.v_row + j, a.v_row, nk,
                   o + r * dv + j, dv);
      }
    }
  }
  for (int64_t t = 0; t < nq; ++t) {
    for (int64_t j = 0; j < g; ++j) {
      const int64_t r = t * g + j;
      const float inv = 1.f / sc.l[r];
      float* dst = a.out + ((a.out_starts[i] + q0 + t) * a.hkv * g + h * g + j) * dv;
      for (int64_t c = 0; c < dv; ++c) dst[c] = o[r * dv + c] * inv;
    }
  }
}

MOE_AVX512 void item_avx512(const Args& a, int64_t i, int64_t h, int64_t q0, Scratch& sc) {
  item<12>(a, i, h, q0, sc);
}
MOE_AVX2 void item_avx2(const Args& a, int64_t i, int64_t h, int64_t q0, Scratch& sc) {
  item<6>(a, i, h, q0, sc);
}
void item_base(const Args& a, int64_t i, int64_t h, int64_t q0, Scratch& sc) {
  item<3>(a, i, h, q0, sc);
}

}  // namespace

// q [T, Hq, D], k [b, Lmax, Hkv, D], v [b, Lmax, Hkv, Dv] (D and Dv contiguous), starts [b]
// (each sequence's first row in q), news [b] (its new tokens), ctxs [b] (its context, news
// included, <= Lmax) -> [sum(news), Hq, Dv].
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                torch::Tensor starts, torch::Tensor news, torch::Tensor ctxs,
                                double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q [T,Hq,D], k/v [b,L,Hkv,D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head dims contiguous");
  const int64_t b = k.size(0), lmax = k.size(1), hkv = k.size(2), d = k.size(3);
  const int64_t hq = q.size(1), dv = v.size(3);
  TORCH_CHECK(hq % hkv == 0 && hq / hkv <= MAXM && q.size(2) == d && dv % 16 == 0,
              "Hq a multiple of Hkv (G <= 48), q's D equal to k's, Dv a multiple of 16");
  TORCH_CHECK(starts.numel() == b && news.numel() == b && ctxs.numel() == b, "b per-sequence");
  auto st = starts.contiguous(), nw = news.contiguous(), cx = ctxs.contiguous();
  auto out_starts = nw.cumsum(0) - nw;
  const int64_t n = nw.sum().item<int64_t>();
  auto out = torch::empty({n, hq, dv}, q.options());
  const int64_t lpad = (lmax + NB - 1) / NB * NB;
  auto kp = torch::empty({b, hkv, lpad * d}, q.options());
  const int64_t g = hq / hkv;
  Args a{q.data_ptr<float>(), q.stride(0), q.stride(1), kp.data_ptr<float>(), lpad,
         v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2), out.data_ptr<float>(),
         st.data_ptr<int64_t>(), nw.data_ptr<int64_t>(), cx.data_ptr<int64_t>(),
         out_starts.data_ptr<int64_t>(), hkv, g, d, dv, std::max<int64_t>(1, MAXM / g),
         static_cast<float>(scale)};
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(a.news[i] >= 1 && a.news[i] <= a.ctxs[i] && a.ctxs[i] <= lmax,
                "1 <= news[i] <= ctxs[i] <= L");
  }
  // K in panels of 16 keys [D][16], zero past each context
  const float* kd = k.data_ptr<float>();
  float* kpw = kp.data_ptr<float>();
  const int64_t panels = lpad / 16;
  at::parallel_for(0, b * hkv * panels, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t pn = t % panels, ih = t / panels, i = ih / hkv, h = ih % hkv;
      float* dst = kpw + (ih * lpad + pn * 16) * d;
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t key = pn * 16 + j;
        if (key < a.ctxs[i]) {
          const float* src = kd + i * k.stride(0) + key * k.stride(1) + h * k.stride(2);
          for (int64_t p = 0; p < d; ++p) dst[p * 16 + j] = src[p];
        } else {
          for (int64_t p = 0; p < d; ++p) dst[p * 16 + j] = 0.f;
        }
      }
    }
  });
  std::vector<std::tuple<int64_t, int64_t, int64_t>> items;  // latest (longest) blocks first
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t q0 = (a.news[i] - 1) / a.bq * a.bq; q0 >= 0; q0 -= a.bq) {
      for (int64_t h = 0; h < hkv; ++h) items.emplace_back(i, h, q0);
    }
  }
  const auto run = pick_isa(item_avx512, item_avx2, item_base);
  struct Buffers : Scratch {
    bool ready = false;
  };
  parallel_items<Buffers>(static_cast<int64_t>(items.size()), [&](int64_t t, Buffers& sc) {
    if (!sc.ready) {
      sc.qs.resize(MAXM * d);
      sc.s.resize(MAXM * NB);
      sc.o.resize(MAXM * dv);
      sc.mx.resize(MAXM);
      sc.l.resize(MAXM);
      sc.ready = true;
    }
    const auto [i, h, q0] = items[t];
    run(a, i, h, q0, sc);
  });
  return out;
}
