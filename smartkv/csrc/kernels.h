// Entry points of the smartkv CPU extension (bound to Python in bindings.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

// Packed rows -> values in `out[index[i]]` (or `out[i]`); see dequant.cpp.
void dequantize_into(std::vector<at::Tensor> planes, std::vector<int64_t> widths, at::Tensor scale,
                     c10::optional<at::Tensor> zero, int64_t bits, int64_t length, int64_t group_size,
                     at::Tensor out, c10::optional<at::Tensor> index);

// Rows of float32 values -> {planes..., scale, zero (asymmetric only)}, bit-identical to
// smartkv.quantize.quantize_rows' PyTorch path; see quantize.cpp.
std::vector<at::Tensor> quantize_rows(at::Tensor x, int64_t bits, int64_t group_size, bool symmetric);

// One decode query's attention over a mixed-precision history read from its packed codes;
// returns {out [B, Hq, D], probs [B, Hq, T]} in float32. See packed_attention.cpp.
std::vector<at::Tensor> packed_decode_attention(
    at::Tensor query, at::Tensor sink_k, at::Tensor sink_v, at::Tensor win_k, at::Tensor win_v,
    std::vector<at::Tensor> planes, std::vector<int64_t> level_bits, std::vector<at::Tensor> scales,
    std::vector<at::Tensor> zeros, std::vector<at::Tensor> indices, int64_t n_quant, int64_t unit_len,
    bool head_major, int64_t group_size, c10::optional<at::Tensor> k_shift, c10::optional<at::Tensor> k_scale,
    c10::optional<at::Tensor> allowed, double scaling, bool evicted_masked);

// One decode query's attention mass [B, H, T] (float32) folded into an importance statistic [B, H, T0]:
// the new statistic [B, H, T], bit-identical to ImportanceTracker.add_step's PyTorch path; see tracker_step.cpp.
at::Tensor fold_attention_step(at::Tensor state, at::Tensor mass, double keep_share, double weight);
