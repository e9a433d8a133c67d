// C = A^T B in float64: the classic three-level blocking (Goto & van de Geijn 2008). B's block is packed into
// panels of kNr columns, A's into panels of kMr rows, both k-major, and a register tile of kMr x kNr sums
// over a block of kKc values of k at a time. Threads take disjoint column blocks of C.
#include "dgemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_clones.h"
#include "diffuse/common.h"

namespace diffuse::detail {
namespace {

constexpr int64_t kMr = 4, kNr = 8;  // register tile: 4 x 8 doubles, eight 4-wide accumulators
constexpr int64_t kKc = 256;         // a packed B panel (kKc x kNr doubles, 16 KB) stays in L1
constexpr int64_t kMc = 64;          // packed A block: kKc x kMc doubles (128 KB)
constexpr int64_t kNc = 256;         // packed B block: kKc x kNc doubles (512 KB), a thread's unit of work

typedef double v4d __attribute__((vector_size(32)));

// c[r * ldc + j] += sum over k < kc of ap[k * kMr + r] * bp[k * kNr + j], for r < mr, j < nr.
DIFFUSE_CPU_CLONES_FMA void micro_kernel(int64_t kc, const double* __restrict__ ap,
                                         const double* __restrict__ bp, double* __restrict__ c, int64_t ldc,
                                         int64_t mr, int64_t nr) {
  v4d acc[kMr][2] = {};
  for (int64_t k = 0; k < kc; ++k) {
    v4d b0, b1;
    std::memcpy(&b0, bp + k * kNr, sizeof b0);
    std::memcpy(&b1, bp + k * kNr + 4, sizeof b1);
    for (int64_t r = 0; r < kMr; ++r) {
      const double a = ap[k * kMr + r];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  double out[kMr][kNr];
  std::memcpy(out, acc, sizeof out);
  for (int64_t r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < nr; ++j) c[r * ldc + j] += out[r][j];
  }
}

// Packs rows [k0, k0 + kc) and columns [c0, c0 + cols) of x (row stride sx0, column stride sx1) into panels
// of `width` columns, k-major, zero-padded to whole panels.
void pack(const double* x, int64_t sx0, int64_t sx1, int64_t k0, int64_t kc, int64_t c0, int64_t cols,
          int64_t width, double* out) {
  for (int64_t p = 0; p < cols; p += width) {
    const int64_t w = std::min(width, cols - p);
    for (int64_t k = 0; k < kc; ++k) {
      const double* row = x + (k0 + k) * sx0 + (c0 + p) * sx1;
      double* dst = out + p * kc + k * width;
      for (int64_t j = 0; j < w; ++j) dst[j] = row[j * sx1];
      for (int64_t j = w; j < width; ++j) dst[j] = 0.0;
    }
  }
}

}  // namespace

at::Tensor gemm_tn_f64(const at::Tensor& a_in, const at::Tensor& b_in) {
  if (a_in.dim() != 2 || b_in.dim() != 2 || a_in.size(0) != b_in.size(0)) {
    throw input_error("gemm_tn_f64: expected A [K, M] and B [K, N]");
  }
  const at::Tensor a = a_in.to(at::kDouble), b = b_in.to(at::kDouble);
  const int64_t k_all = a.size(0), m = a.size(1), n = b.size(1);
  at::Tensor c = at::zeros({m, n}, at::kDouble);
  if (m == 0 || n == 0 || k_all == 0) return c;
  const double* ap = a.data_ptr<double>();
  const double* bp = b.data_ptr<double>();
  double* cp = c.data_ptr<double>();
  const int64_t sa0 = a.stride(0), sa1 = a.stride(1), sb0 = b.stride(0), sb1 = b.stride(1);
  const int64_t blocks = (n + kNc - 1) / kNc;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<double> a_pack(static_cast<size_t>(kKc * kMc)), b_pack(static_cast<size_t>(kKc * kNc));
    for (int64_t block = first; block < last; ++block) {
      const int64_t j0 = block * kNc, nc = std::min(kNc, n - j0);
      for (int64_t k0 = 0; k0 < k_all; k0 += kKc) {
        const int64_t kc = std::min(kKc, k_all - k0);
        pack(bp, sb0, sb1, k0, kc, j0, nc, kNr, b_pack.data());
        for (int64_t i0 = 0; i0 < m; i0 += kMc) {
          const int64_t mc = std::min(kMc, m - i0);
          pack(ap, sa0, sa1, k0, kc, i0, mc, kMr, a_pack.data());
          for (int64_t jr = 0; jr < nc; jr += kNr) {
            for (int64_t ir = 0; ir < mc; ir += kMr) {
              micro_kernel(kc, a_pack.data() + ir * kc, b_pack.data() + jr * kc, cp + (i0 + ir) * n + j0 + jr,
                           n, std::min(kMr, mc - ir), std::min(kNr, nc - jr));
            }
          }
        }
      }
    }
  });
  return c;
}

}  // namespace diffuse::detail
