// The sampler's pass over a step's logits for greedy rows: per row the first index of its
// largest value (torch.argmax) and whether every value is finite, in one read of [N, V]
// instead of three ATen reductions (argmax, amin, amax) over it.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

// logits [N, V] fp32 -> (ids [N] int64, finite [N] bool). A row with a NaN or an infinity is
// not finite (its id is then meaningless: the caller samples that row another way).
std::tuple<torch::Tensor, torch::Tensor> greedy_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32,
              "logits must be fp32 [N, V]");
  logits = logits.contiguous();
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0, "logits need at least one column");
  auto ids = torch::empty({n}, logits.options().dtype(torch::kInt64));
  auto finite = torch::empty({n}, logits.options().dtype(torch::kBool));
  const float* l = logits.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  bool* ok = finite.data_ptr<bool>();
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* x = l + r * v;
      float best = x[0];
      int64_t at = 0;
      bool all_finite = true;
      for (int64_t j = 0; j < v; ++j) {
        all_finite = all_finite && std::isfinite(x[j]);
        if (x[j] > best) {
          best = x[j];
          at = j;
        }
      }
      id[r] = at;
      ok[r] = all_finite;
    }
  });
  return {ids, finite};
}
