// The CPU side of an expert-parallel dispatch over shared memory (workers/moe/dispatch.py,
// `AllToAllDispatcher` with the shm transport), in four calls instead of ~30 ATen ops and
// Python loops per MoE layer (for a decode step's few rows each op is mostly dispatch):
// - ep_plan: top-k expert ids -> the (destination rank, token) rows to send, deduplicated.
// - ep_pack: one peer's message: its x rows, then their ids + weight bits as int64 [n, 2K].
// - ep_unpack: this rank's own rows and every peer's message -> recv_x, recv_ids, recv_weights.
// - ep_combine: the expert outputs of every rank (own block and each peer's returned rows)
//   summed per source token, in rank order.
// Wire format and row order are those of the torch path, so ranks with and without the
// kernels exchange the same bytes and compute the same sums.

#include "kernels.h"

#include <cstring>
#include <tuple>
#include <vector>

// ids [T, K] int64 expert ids, expert_to_rank [E] int64, world W ->
// (send_token [S] int64 ordered by (rank, token), counts [W] int64): token t goes once to each
// rank owning one of its experts.
std::tuple<torch::Tensor, torch::Tensor> ep_plan(torch::Tensor ids, torch::Tensor expert_to_rank,
                                                 int64_t world) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == torch::kInt64, "ids must be int64 [T, K]");
  TORCH_CHECK(expert_to_rank.dim() == 1 && expert_to_rank.scalar_type() == torch::kInt64,
              "expert_to_rank must be int64 [E]");
  ids = ids.contiguous();
  expert_to_rank = expert_to_rank.contiguous();
  const int64_t t = ids.size(0), k = ids.size(1), e = expert_to_rank.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* e2r = expert_to_rank.data_ptr<int64_t>();
  // [T, W] flags as one byte each: W is small (ranks of one gang)
  std::vector<uint8_t> to(static_cast<size_t>(t * world), 0);
  auto counts = torch::zeros({world}, ids.options());
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t ex = id[r * k + j];
      TORCH_CHECK(ex >= 0 && ex < e, "expert id ", ex, " outside [0, ", e, ")");
      const int64_t d = e2r[ex];
      TORCH_CHECK(d >= 0 && d < world, "expert ", ex, " maps to rank ", d, " outside the group");
      uint8_t& f = to[static_cast<size_t>(r * world + d)];
      c[d] += !f;
      f = 1;
    }
  }
  int64_t total = 0;
  for (int64_t d = 0; d < world; ++d) total += c[d];
  auto send = torch::empty({total}, ids.options());
  int64_t* s = send.data_ptr<int64_t>();
  for (int64_t d = 0, at = 0; d < world; ++d) {
    for (int64_t r = 0; r < t; ++r) {
      if (to[static_cast<size_t>(r * world + d)]) s[at++] = r;
    }
  }
  return {send, counts};
}

namespace {

// One row's ids and fp32 weight bits as 2K int64s: the weight bits sign-extended from int32,
// as the torch path's `.view(int32).to(int64)`.
inline void pack_meta(int64_t* out, const int64_t* id, const float* w, int64_t k) {
  for (int64_t j = 0; j < k; ++j) out[j] = id[j];
  for (int64_t j = 0; j < k; ++j) {
    int32_t bits;
    std::memcpy(&bits, w + j, sizeof bits);
    out[k + j] = static_cast<int64_t>(bits);
  }
}

inline void unpack_meta(int64_t* id, float* w, const int64_t* in, int64_t k) {
  for (int64_t j = 0; j < k; ++j) id[j] = in[j];
  for (int64_t j = 0; j < k; ++j) {
    const int32_t bits = static_cast<int32_t>(in[k + j]);  // narrowed back, as .to(int32)
    std::memcpy(w + j, &bits, sizeof bits);
  }
}

void check_rows(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& weights) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [T, H] tensor");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous(),
              "ids must be contiguous int64 [T, K]");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == torch::kFloat32 &&
                  weights.is_contiguous(),
              "weights must be contiguous fp32 [T, K]");
  TORCH_CHECK(ids.size(0) == x.size(0), "x and ids disagree on T");
}

}  // namespace

// x [T, H] (any dtype, copied as bytes), ids [T, K] int64, weights [T, K] fp32, rows [n] int64
// (tokens in [0, T)), out uint8 [n * (H * x.element_size() + 2K * 8)]: writes the message
// (rows of x, then [n, 2K] int64 ids and weight bits) into out.
void ep_pack(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor rows,
             torch::Tensor out) {
  check_rows(x, ids, weights);
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kInt64, "rows must be int64 [n]");
  rows = rows.contiguous();
  const int64_t t = x.size(0), k = ids.size(1), n = rows.size(0);
  const int64_t row_x = x.size(1) * x.element_size(), row_meta = 2 * k * 8;
  TORCH_CHECK(out.scalar_type() == torch::kUInt8 && out.is_contiguous() &&
                  out.numel() == n * (row_x + row_meta),
              "out must be contiguous uint8 of the message's size");
  const auto* src = static_cast<const uint8_t*>(x.data_ptr());
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  uint8_t* meta = o + n * row_x;  // not 8-aligned when row_x * n is not: copied in
  std::vector<int64_t> m(static_cast<size_t>(2 * k));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t tok = r[i];
    TORCH_CHECK(tok >= 0 && tok < t, "row ", tok, " outside [0, ", t, ")");
    std::memcpy(o + i * row_x, src + tok * row_x, static_cast<size_t>(row_x));
    pack_meta(m.data(), id + tok * k, w + tok * k, k);
    std::memcpy(meta + i * row_meta, m.data(), static_cast<size_t>(row_meta));
  }
}

// x [T, H], ids [T, K] int64, weights [T, K] fp32: this rank's tokens; own [n0] int64: its rows
// that stay here; messages: one uint8 message per peer in rank order (this rank's own
// excluded), counts: their rows -> (recv_x [R, H], recv_ids [R, K] int64, recv_weights [R, K]
// fp32), own rows first, then each peer's in rank order. recv_x is written into `recv_x_out`
// (a reused buffer of at least R rows; its first R rows are returned).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> ep_unpack(
    torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor own,
    std::vector<torch::Tensor> messages, std::vector<int64_t> counts, torch::Tensor recv_x_out) {
  check_rows(x, ids, weights);
  TORCH_CHECK(own.dim() == 1 && own.scalar_type() == torch::kInt64, "own must be int64 [n]");
  TORCH_CHECK(messages.size() == counts.size(), "one count per message");
  own = own.contiguous();
  const int64_t t = x.size(0), h = x.size(1), k = ids.size(1), n0 = own.size(0);
  const int64_t row_x = h * x.element_size(), row_meta = 2 * k * 8;
  int64_t total = n0;
  for (size_t m = 0; m < messages.size(); ++m) {
    const auto& msg = messages[m];
    TORCH_CHECK(msg.scalar_type() == torch::kUInt8 && msg.is_contiguous() &&
                    msg.numel() == counts[m] * (row_x + row_meta),
                "message ", m, " is not ", counts[m], " whole rows");
    total += counts[m];
  }
  TORCH_CHECK(recv_x_out.scalar_type() == x.scalar_type() && recv_x_out.is_contiguous() &&
                  recv_x_out.dim() == 2 && recv_x_out.size(1) == h &&
                  recv_x_out.size(0) >= total,
              "recv_x_out must be a contiguous [>= R, H] buffer of x's dtype");
  auto recv_x = recv_x_out.narrow(0, 0, total);
  auto recv_ids = torch::empty({total, k}, ids.options());
  auto recv_w = torch::empty({total, k}, weights.options());
  auto* rx = static_cast<uint8_t*>(recv_x.data_ptr());
  int64_t* ri = recv_ids.data_ptr<int64_t>();
  float* rw = recv_w.data_ptr<float>();
  const auto* src = static_cast<const uint8_t*>(x.data_ptr());
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  const int64_t* o = own.data_ptr<int64_t>();
  for (int64_t i = 0; i < n0; ++i) {
    const int64_t tok = o[i];
    TORCH_CHECK(tok >= 0 && tok < t, "row ", tok, " outside [0, ", t, ")");
    std::memcpy(rx + i * row_x, src + tok * row_x, static_cast<size_t>(row_x));
    for (int64_t j = 0; j < k; ++j) ri[i * k + j] = id[tok * k + j];
    for (int64_t j = 0; j < k; ++j) rw[i * k + j] = w[tok * k + j];
  }
  int64_t at = n0;
  for (size_t m = 0; m < messages.size(); ++m) {
    const int64_t n = counts[m];
    if (n == 0) continue;
    const uint8_t* msg = messages[m].data_ptr<uint8_t>();
    std::memcpy(rx + at * row_x, msg, static_cast<size_t>(n * row_x));
    std::vector<int64_t> meta(static_cast<size_t>(n * 2 * k));  // the message may be unaligned
    std::memcpy(meta.data(), msg + n * row_x, meta.size() * sizeof(int64_t));
    for (int64_t i = 0; i < n; ++i) {
      unpack_meta(ri + (at + i) * k, rw + (at + i) * k, meta.data() + i * 2 * k, k);
    }
    at += n;
  }
  return {recv_x, recv_ids, recv_w};
}

// own [n_me, H] fp32: this rank's expert outputs for its own rows; parts: per rank in order the
// rows returned by that rank [send_splits[r], H] fp32 (ignored at index `me`); send_token [S]
// int64 ordered by (rank, token), send_splits [W], num_tokens T -> y [T, H]: per token the sum
// of its rows, added one rank at a time in rank order (as index_add_ block by block).
torch::Tensor ep_combine(torch::Tensor own, std::vector<c10::optional<torch::Tensor>> parts,
                         torch::Tensor send_token, std::vector<int64_t> send_splits, int64_t me,
                         int64_t num_tokens) {
  TORCH_CHECK(own.dim() == 2 && own.scalar_type() == torch::kFloat32, "own must be fp32 [n, H]");
  TORCH_CHECK(parts.size() == send_splits.size(), "one part per rank");
  TORCH_CHECK(me >= 0 && me < static_cast<int64_t>(parts.size()), "me outside the group");
  own = own.contiguous();
  send_token = send_token.contiguous();
  const int64_t h = own.size(1);
  auto y = torch::zeros({num_tokens, h}, own.options());
  float* out = y.data_ptr<float>();
  const int64_t* tok = send_token.data_ptr<int64_t>();
  int64_t start = 0;
  for (size_t r = 0; r < parts.size(); ++r) {
    const int64_t n = send_splits[r];
    if (n == 0) continue;
    torch::Tensor part;
    if (static_cast<int64_t>(r) == me) {
      part = own;
    } else {
      TORCH_CHECK(parts[r].has_value(), "no rows from rank ", r);
      part = parts[r]->contiguous();
    }
    TORCH_CHECK(part.scalar_type() == torch::kFloat32 && part.dim() == 2 && part.size(0) >= n &&
                    part.size(1) == h,
                "rows from rank ", r, " must be fp32 [", n, ", ", h, "]");
    const float* p = part.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t dst = tok[start + i];
      TORCH_CHECK(dst >= 0 && dst < num_tokens, "token ", dst, " outside [0, ", num_tokens, ")");
      float* yr = out + dst * h;
      const float* pr = p + i * h;
      for (int64_t c = 0; c < h; ++c) yr[c] += pr[c];
    }
    start += n;
  }
  return y;
}
