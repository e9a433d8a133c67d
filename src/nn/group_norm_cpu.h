#pragma once
// GroupNorm (+ SiLU) on the CPU, forward and backward, one (image, group) block at a time: no LibTorch here, so that
// group_norm_cpu.cpp is compiled with -fno-math-errno and -fno-trapping-math (which GCC needs to vectorize the exp's
// clamp) and without the precompiled header.
#include <cstdint>

namespace diffuse {
namespace nn_detail {

// y = GroupNorm(x) w + b, then SiLU with `silu`, for one block of cg channels of hw pixels each, contiguous float32
// (x and y point at the block's first channel; w and b at its first channel's parameters). Moments as the fused
// kernels take them: the mean, then sums about it (float32), var = E[(x - m)^2] - E[x - m]^2.
// With `stats`, the block's mean and 1/sqrt(var + eps) go to stats[0] and stats[1] (for group_norm_block_backward).
void group_norm_block(const float* x, float* y, int64_t cg, int64_t hw, const float* w, const float* b, float eps,
                      bool silu, float* stats = nullptr);

// The gradients of one block of group_norm_block from its x, stats and the output's gradient dy: dx (for the whole
// block) and, per channel k of the block, dw[k] = sum over its pixels of dv (x - mean) rstd and db[k] = sum of dv,
// where dv is dy, or with `silu` dy times SiLU's derivative at the pre-activation recomputed as forward computed it.
// scratch: cg * hw floats (with SiLU dv, kept for the second pass over the block). dx must not overlap dy or x.
void group_norm_block_backward(const float* x, const float* dy, float* dx, int64_t cg, int64_t hw, const float* w,
                               const float* b, const float* stats, bool silu, float* scratch, float* dw, float* db);

// e^x for float32 x, vectorizable: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes' expf
// coefficients), within 2 ulp of expf over [-87, 88]; clamped outside it.
float exp_vectorizable(float x);

}  // namespace nn_detail
}  // namespace diffuse
