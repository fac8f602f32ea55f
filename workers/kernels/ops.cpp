// Python bindings of the C++ CPU kernels (see workers/kernels/__init__.py), and the CPU's
// instruction set, detected once.
#include "kernels.h"

#include <cstdlib>
#include <string>

Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    Isa best = Isa::kBase;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl")) {
      best = Isa::kAvx512;
    }
#else
    Isa best = Isa::kBase;
#endif
    const char* cap = std::getenv("MOE_ISA");
    if (cap != nullptr && std::string(cap) == "base") return Isa::kBase;
    if (cap != nullptr && std::string(cap) == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

static std::string isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("routed_ffn", &routed_ffn, "routed experts' SwiGLU FFN, grouped by expert, no padding",
        py::arg("x"), py::arg("tokens"), py::arg("weights"), py::arg("counts"), py::arg("w13"),
        py::arg("w2"), py::arg("w13_packed") = py::none(), py::arg("w2_packed") = py::none());
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention reading K/V in place from the paged cache");
  m.def("prefill_attention", &prefill_attention,
        "causal attention of each sequence's new queries over its context, no mask tensor");
  m.def("linear", &linear, "x W^T (+ b) with W packed in 16-output panels, fp32");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows in one pass");
  m.def("softmax_topk", &softmax_topk, "router logits -> top-k expert ids and softmax weights");
  m.def("group_pairs", &group_pairs, "a rank's (token, expert) pairs grouped by local expert");
  m.def("greedy_rows", &greedy_rows, "per row: argmax and whether every logit is finite");
  m.def("rope_qk", &rope_qk,
        "q/k per-head RMSNorm, NeoX rotary in place, and the new KV rows into the cache",
        py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("q_norm"),
        py::arg("k_norm"), py::arg("eps"), py::arg("cache") = py::none(),
        py::arg("slots") = py::none(), py::arg("v") = py::none());
  m.def("ep_plan", &ep_plan, "expert-parallel dispatch: the (rank, token) rows to send");
  m.def("ep_pack", &ep_pack, "expert-parallel dispatch: one peer's message (rows, ids, weights)");
  m.def("ep_unpack", &ep_unpack, "expert-parallel dispatch: own rows and peers' messages");
  m.def("ep_combine", &ep_combine, "expert-parallel combine: rows summed per token, rank order");
  m.def("fma_peak", &fma_peak, "fp32 multiply-add GFLOP/s of the intra-op threads, width");
  m.def("isa", &isa_name, "the instruction set the kernels run with: avx512, avx2 or base");
}
