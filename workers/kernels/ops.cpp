// Python bindings of the C++ CPU kernels (see workers/kernels/__init__.py).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("routed_ffn", &routed_ffn, "routed experts' SwiGLU FFN, grouped by expert, no padding");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention reading K/V in place from the paged cache");
}
