// Python bindings of the smartkv CPU extension (built by smartkv/kernels.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_into", &dequantize_into, "packed rows -> values scattered into out (see dequant.cpp)");
  m.def("quantize_rows", &quantize_rows, "rows -> packed planes, scale, zero per group (see quantize.cpp)");
  m.def("packed_decode_attention", &packed_decode_attention,
        "decode attention over a mixed-precision history read from packed codes (see packed_attention.cpp)");
  m.def("fold_attention_step", &fold_attention_step,
        "one decode query's attention mass folded into an importance statistic (see tracker_step.cpp)");
}
