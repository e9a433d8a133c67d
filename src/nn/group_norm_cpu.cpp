#include "nn/group_norm_cpu.h"

#include <algorithm>
#include <cmath>

#include "cpu_clones.h"

namespace diffuse {
namespace nn_detail {

namespace {

inline float exp_inline(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // n = round(x / ln 2): x log2(e) + 0.5 lies in (-126, 128), so 128 above it truncation is floor.
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float n = static_cast<float>(ni);
  // x - n ln 2 in two parts (ln 2 = 0.693359375 - 2.12194440e-4), exact for the first.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;  // 2^n, n in [-126, 127]
  return p * __builtin_bit_cast(float, bits);
}

}  // namespace

float exp_vectorizable(float x) { return exp_inline(x); }

DIFFUSE_CPU_CLONES void group_norm_block(const float* __restrict__ x, float* __restrict__ y, int64_t cg, int64_t hw,
                                         const float* __restrict__ w, const float* __restrict__ b, float eps,
                                         bool silu) {
  const int64_t d = cg * hw;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += x[i];
  const float m0 = sum / static_cast<float>(d);
  float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < d; ++i) {
    const float v = x[i] - m0;
    s1 += v;
    s2 += v * v;
  }
  const float shift = s1 / static_cast<float>(d);
  const float var = s2 / static_cast<float>(d) - shift * shift;
  const float rstd = 1.0f / std::sqrt((var > 0.0f ? var : 0.0f) + eps);
  for (int64_t k = 0; k < cg; ++k) {
    // ((x - m0) - shift) rstd w + b = x a + c per channel.
    const float a = rstd * w[k];
    const float c = b[k] - (m0 + shift) * a;
    const float* xr = x + k * hw;
    float* yr = y + k * hw;
    if (silu) {
#pragma omp simd
      for (int64_t p = 0; p < hw; ++p) {
        const float v = xr[p] * a + c;
        yr[p] = v / (1.0f + exp_inline(-v));
      }
    } else {
#pragma omp simd
      for (int64_t p = 0; p < hw; ++p) yr[p] = xr[p] * a + c;
    }
  }
}

}  // namespace nn_detail
}  // namespace diffuse
