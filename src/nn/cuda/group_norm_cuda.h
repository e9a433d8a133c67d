// Launchers of the fused GroupNorm (+ SiLU) CUDA kernels (group_norm.cu; the arithmetic is
// src/nn/group_norm_kernel.h). Kept free of CUDA and ATen headers: the stream is a cudaStream_t passed as void*,
// the element type a flag. Each returns nullptr, or the CUDA error's text when the launch failed.
#pragma once

#include "nn/group_norm_kernel.h"

namespace diffuse {
namespace gn_cuda {

// x, y: [N, C, HW] contiguous, float32 (bf16 = false) or bfloat16; addend: [N, C] float32 added to x before
// the normalization (channels contiguous, rows shape.addend_row apart), or nullptr; w, b: [C] float32; stats:
// [N, G, 3] float32 (gn_kernel::Moments).
const char* forward(bool bf16, const void* x, const float* addend, const float* w, const float* b, void* y,
                    float* stats, const gn_kernel::Shape& shape, float eps, bool silu, void* stream);
// dy, dx like x; dw_part, db_part: [N, C] float32 (sum over N for the parameters' gradients); d_addend: [N, C]
// float32, the addend's gradient (with an addend), or nullptr.
const char* backward(bool bf16, const void* x, const float* addend, const void* dy, const float* w, const float* b,
                     const float* stats, const gn_kernel::Shape& shape, bool silu, void* dx, float* dw_part,
                     float* db_part, float* d_addend, void* stream);

// The same for x, y, dy, dx [N, C, H, W] in NHWC memory (channels-last contiguous); the other arguments as
// above.
const char* forward_nhwc(bool bf16, const void* x, const float* addend, const float* w, const float* b,
                         void* y, float* stats, const gn_kernel::Shape& shape, float eps, bool silu,
                         void* stream);
const char* backward_nhwc(bool bf16, const void* x, const float* addend, const void* dy, const float* w,
                          const float* b, const float* stats, const gn_kernel::Shape& shape, bool silu,
                          void* dx, float* dw_part, float* db_part, float* d_addend, void* stream);

}  // namespace gn_cuda
}  // namespace diffuse
