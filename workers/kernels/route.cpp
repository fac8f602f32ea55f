// Routing of a MoE layer's tokens in two C++ calls instead of ~15 ATen ops (each, for a decode
// step's few rows, mostly dispatch):
// - softmax_topk: router logits -> the top-k experts of each token and their softmax weights
//   (Qwen-MoE / Mixtral gating; fp32 like transformers; optionally renormalised over the k).
// - group_pairs: (token, expert) pairs -> the pairs this rank owns, grouped by local expert in
//   (token, k) order (a stable counting sort), with each expert's count: what routed_ffn reads.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

// a (index ia) ranks before b (index ib): larger first, NaN above everything (as torch.topk),
// equal values by lower index.
inline bool before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

}  // namespace

// logits [T, E] fp32 -> (ids [T, K] int64, weights [T, K] fp32), ids by descending weight.
std::tuple<torch::Tensor, torch::Tensor> softmax_topk(torch::Tensor logits, int64_t k,
                                                      bool renormalize) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32,
              "logits must be fp32 [T, E]");
  logits = logits.contiguous();
  const int64_t t = logits.size(0), e = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= e, "k must be in [1, E]");
  auto ids = torch::empty({t, k}, logits.options().dtype(torch::kInt64));
  auto weights = torch::empty({t, k}, logits.options());
  const float* l = logits.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  float* w = weights.data_ptr<float>();
  at::parallel_for(0, t, 256, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(static_cast<size_t>(e));
    for (int64_t r = lo; r < hi; ++r) {
      const float* x = l + r * e;
      float m = x[0];
      for (int64_t j = 1; j < e; ++j) m = std::max(m, x[j]);
      float s = 0.f;
      for (int64_t j = 0; j < e; ++j) s += (p[j] = std::exp(x[j] - m));
      for (int64_t j = 0; j < e; ++j) p[j] /= s;
      int64_t* ri = id + r * k;
      float* rw = w + r * k;
      for (int64_t c = 0; c < k; ++c) {  // k passes: k is small (2-8)
        int64_t best = -1;
        for (int64_t j = 0; j < e; ++j) {
          bool taken = false;
          for (int64_t q = 0; q < c; ++q) taken = taken || ri[q] == j;
          if (!taken && (best < 0 || before(p[j], j, p[best], best))) best = j;
        }
        ri[c] = best;
        rw[c] = p[best];
      }
      if (renormalize) {
        float sum = 0.f;
        for (int64_t c = 0; c < k; ++c) sum += rw[c];
        for (int64_t c = 0; c < k; ++c) rw[c] /= sum;
      }
    }
  });
  return {ids, weights};
}

// ids [T, K] int64 global expert ids; weights [T, K] fp32; expert_map [E] int64 (local expert
// of each global id, -1 where another rank owns it); num_local El ->
// (tokens [N] int64, pair weights [N] fp32, counts [El] int64): the owned pairs grouped by local
// expert, in (token, k) order within an expert.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_pairs(torch::Tensor ids,
                                                                    torch::Tensor weights,
                                                                    torch::Tensor expert_map,
                                                                    int64_t num_local) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous(),
              "ids must be contiguous int64 [T, K]");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == torch::kFloat32 &&
                  weights.is_contiguous(),
              "weights must be contiguous fp32 shaped like ids");
  TORCH_CHECK(expert_map.dim() == 1 && expert_map.scalar_type() == torch::kInt64 &&
                  expert_map.is_contiguous(),
              "expert_map must be contiguous int64 [E]");
  const int64_t pairs = ids.numel(), k = ids.size(1), e = expert_map.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* map = expert_map.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  auto counts = torch::zeros({num_local}, ids.options());
  int64_t* c = counts.data_ptr<int64_t>();
  std::vector<int64_t> local(static_cast<size_t>(pairs));
  int64_t n = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(id[p] >= 0 && id[p] < e, "expert id out of range");
    const int64_t l = map[id[p]];
    local[p] = l;
    if (l >= 0) {
      TORCH_CHECK(l < num_local, "expert_map names a local expert beyond num_local");
      ++c[l];
      ++n;
    }
  }
  std::vector<int64_t> next(static_cast<size_t>(num_local));
  for (int64_t l = 0, at = 0; l < num_local; ++l) {
    next[l] = at;
    at += c[l];
  }
  auto tokens = torch::empty({n}, ids.options());
  auto pair_weights = torch::empty({n}, weights.options());
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* pw = pair_weights.data_ptr<float>();
  for (int64_t p = 0; p < pairs; ++p) {
    if (local[p] < 0) continue;
    const int64_t at = next[local[p]]++;
    tok[at] = p / k;
    pw[at] = w[p];
  }
  return {tokens, pair_weights, counts};
}
