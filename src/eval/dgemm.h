// Double-precision matrix products for the metrics' D x D work (FD's covariances and matrix square roots at
// D = 2048 for Inception features). Debian's LibTorch sends float64 products to the reference BLAS, ~1.5
// GFLOP/s on this project's CPUs; these are cache-blocked, packed and vectorized (AVX-512 / AVX2 clones) on
// all threads.
#pragma once

#include <ATen/core/Tensor.h>

namespace diffuse::detail {

// A^T B for float64 A [K, M] and B [K, N] (any strides): float64 [M, N]. Each element's sum runs over k in
// blocks in a fixed order, so the result does not depend on the thread count.
at::Tensor gemm_tn_f64(const at::Tensor& a, const at::Tensor& b);

}  // namespace diffuse::detail
