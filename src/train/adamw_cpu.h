#pragma once
// The CPU AdamW step as one fused pass (AdamW::apply's fast path): no LibTorch here, so that adamw_cpu.cpp is compiled
// with -fno-math-errno (a vectorized square root) and without the precompiled header.
#include <cstdint>

namespace diffuse {

struct AdamWNumbers {
  float decay;         // 1 - lr wd
  float one_minus_b1;  // 1 - beta1
  float b2;
  float one_minus_b2;
  float sqrt_bc2;  // sqrt(1 - beta2^t)
  float neg_step;  // -lr / (1 - beta1^t)
  float eps;
};

// One AdamW step over [0, n) of the flat parameters p, gradient g and moments m, v, in one pass: the arithmetic of
// AdamW::apply's tensor expressions element by element in float32 (fused multiply-adds where the CPU has them).
void adamw_span(float* p, const float* g, float* m, float* v, int64_t n, const AdamWNumbers& s);

}  // namespace diffuse
