// The metrics' float64 products (src/eval/dgemm.h) against LibTorch's, on shapes that cover every partial
// tile and block, on strided (transposed) operands, and at one thread and at several.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include "eval/dgemm.h"

namespace {

TEST(Dgemm, IsTheProductOnEveryShape) {
  at::Generator g = at::detail::createCPUGenerator(5);
  const int64_t shapes[][3] = {{1, 1, 1},      {3, 5, 7},      {129, 4, 16},
                               {130, 67, 257}, {300, 70, 300}, {257, 258, 513}};
  for (const auto& s : shapes) {
    const int64_t k = s[0], m = s[1], n = s[2];
    SCOPED_TRACE(std::to_string(k) + "x" + std::to_string(m) + "x" + std::to_string(n));
    const at::Tensor a = at::randn({k, m}, g, at::kDouble), b = at::randn({k, n}, g, at::kDouble);
    const at::Tensor want = a.t().mm(b);
    const at::Tensor got = diffuse::detail::gemm_tn_f64(a, b);
    ASSERT_EQ(got.sizes(), want.sizes());
    EXPECT_LT((got - want).abs().max().item<double>(), 1e-12 * std::sqrt(static_cast<double>(k)) * 10);
    // Transposed views (column-major operands) give the same bits as contiguous copies.
    const at::Tensor at_ = a.t().contiguous().t(), bt = b.t().contiguous().t();
    EXPECT_TRUE(at::equal(diffuse::detail::gemm_tn_f64(at_, bt), got));
  }
}

TEST(Dgemm, SameBitsOnAnyThreadCount) {
  at::Generator g = at::detail::createCPUGenerator(6);
  const at::Tensor a = at::randn({300, 200}, g, at::kDouble), b = at::randn({300, 600}, g, at::kDouble);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = diffuse::detail::gemm_tn_f64(a, b);
  at::set_num_threads(3);
  const at::Tensor three = diffuse::detail::gemm_tn_f64(a, b);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, three));
}

}  // namespace
