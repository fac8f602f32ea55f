// The C++ CPU kernels of workers/kernels, bound to Python in ops.cpp.
#pragma once

#include <torch/extension.h>

torch::Tensor routed_ffn(torch::Tensor x, torch::Tensor tokens, torch::Tensor weights,
                         torch::Tensor counts, torch::Tensor w13, torch::Tensor w2);

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor cache,
                                     torch::Tensor context_slots, torch::Tensor context_lens,
                                     int64_t num_kv_heads, int64_t k_offset,
                                     int64_t k_head_stride, int64_t v_offset,
                                     int64_t v_head_stride, int64_t v_dim, double scale);
