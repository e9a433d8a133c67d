#include "train/adamw_cpu.h"

#include <cmath>

#include "cpu_clones.h"

namespace diffuse {

DIFFUSE_CPU_CLONES void adamw_span(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                   float* __restrict__ v, int64_t n, const AdamWNumbers& s) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = m[i] + s.one_minus_b1 * (gi - m[i]);  // lerp toward g
    const float vi = v[i] * s.b2 + s.one_minus_b2 * gi * gi;
    const float denom = std::sqrt(vi) / s.sqrt_bc2 + s.eps;
    p[i] = p[i] * s.decay + (mi * s.neg_step) / denom;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace diffuse
