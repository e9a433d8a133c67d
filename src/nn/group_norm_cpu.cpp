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
                                         bool silu, float* stats) {
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
  const float mean = m0 + shift;
  if (stats) {
    stats[0] = mean;
    stats[1] = rstd;
  }
  for (int64_t k = 0; k < cg; ++k) {
    // ((x - m0) - shift) rstd w + b = x a + c per channel (group_norm_block_backward recomputes it so).
    const float a = rstd * w[k];
    const float c = b[k] - mean * a;
    const float* xr = x + k * hw;
    float* yr = y + k * hw;
    if (silu) {
#pragma omp simd
      for (int64_t p = 0; p < hw; ++p) {
        const float v = xr[p] * a + c;
        yr[p] = v * (1.0f / (1.0f + exp_inline(-v)));
      }
    } else {
#pragma omp simd
      for (int64_t p = 0; p < hw; ++p) yr[p] = xr[p] * a + c;
    }
  }
}

DIFFUSE_CPU_CLONES void group_norm_block_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                                  float* __restrict__ dx, int64_t cg, int64_t hw,
                                                  const float* __restrict__ w, const float* __restrict__ b,
                                                  const float* stats, bool silu, float* __restrict__ scratch,
                                                  float* __restrict__ dw, float* __restrict__ db) {
  const float mean = stats[0], rstd = stats[1];
  // Pass 1: with SiLU dv (at v = x a + c, as forward computed v) into scratch; per channel the sums of dv and of
  // dv (x - mean), which give the parameters' gradients and the group's two sums A = sum w dv, B = sum w dv (x - mean).
  float sum_a = 0.0f, sum_b = 0.0f;
  for (int64_t k = 0; k < cg; ++k) {
    const float* xr = x + k * hw;
    const float* gr = dy + k * hw;
    float s_dv = 0.0f, s_dvx = 0.0f;
    if (silu) {
      float* dvr = scratch + k * hw;
      const float a = rstd * w[k];
      const float c = b[k] - mean * a;
#pragma omp simd reduction(+ : s_dv, s_dvx)
      for (int64_t p = 0; p < hw; ++p) {
        const float v = xr[p] * a + c;
        const float sig = 1.0f / (1.0f + exp_inline(-v));
        const float d = gr[p] * (sig * (1.0f + v * (1.0f - sig)));
        dvr[p] = d;
        s_dv += d;
        s_dvx += d * (xr[p] - mean);
      }
    } else {
#pragma omp simd reduction(+ : s_dv, s_dvx)
      for (int64_t p = 0; p < hw; ++p) {
        s_dv += gr[p];
        s_dvx += gr[p] * (xr[p] - mean);
      }
    }
    db[k] = s_dv;
    dw[k] = s_dvx * rstd;
    sum_a += w[k] * s_dv;
    sum_b += w[k] * s_dvx;
  }
  // Pass 2: with xhat = (x - mean) rstd and D elements in the group,
  // dx = rstd (w dv - A / D - xhat rstd B / D) = dv (rstd w) + (x - mean) q + r.
  const float inv_d = 1.0f / static_cast<float>(cg * hw);
  const float q = -rstd * rstd * rstd * sum_b * inv_d;
  const float r = -rstd * sum_a * inv_d;
  const float* dv = silu ? scratch : dy;  // without SiLU dv is dy
  for (int64_t k = 0; k < cg; ++k) {
    const float a = rstd * w[k];
    const float* xr = x + k * hw;
    const float* dvr = dv + k * hw;
    float* dxr = dx + k * hw;
#pragma omp simd
    for (int64_t p = 0; p < hw; ++p) dxr[p] = dvr[p] * a + (xr[p] - mean) * q + r;
  }
}

}  // namespace nn_detail
}  // namespace diffuse
