// The fused GroupNorm (+ SiLU) block program (nn/group_norm_kernel.h), run on the CPU as the CUDA kernels run it
// block by block: forward and backward against LibTorch's GroupNorm in float64, in float32 and bfloat16.
#include <gtest/gtest.h>

#include "diffuse/common.h"
#include "diffuse/nn/unet.h"
#include "fused_norm_check.h"
#include "nn/blocks.h"
#include "nn/group_norm_kernel.h"

namespace {

using diffuse::nn_detail::fused_group_norm;

TEST(FusedNorm, BlockProgramIsGroupNorm) { fused_norm_check::check_all_cases(at::kCPU); }

// The channels-last block program (NHWC memory read as it is): the same function, in x's layout.
TEST(FusedNorm, NhwcBlockProgramIsGroupNorm) { fused_norm_check::check_all_cases(at::kCPU, true); }

// The NHWC blocks fit the CUDA kernels' launch bound and cover every group once, whatever the channels,
// groups and pixels: whole groups per block, at most kNhwcMaxThreads threads, no more rows than pixels.
TEST(FusedNorm, NhwcTilesFitTheKernels) {
  namespace gk = diffuse::gn_kernel;
  int64_t shapes = 0;
  for (int64_t c : {3, 6, 32, 64, 96, 128, 192, 256, 384, 512, 640, 896, 1024}) {
    for (int64_t groups = 1; groups <= c; ++groups) {
      if (c % groups != 0 || c / groups > gk::kNhwcMaxWidth) continue;
      for (int64_t hw : {1, 16, 49, 196, 784, 1024}) {
        const gk::Shape s{2, c, hw, groups};
        const gk::NhwcTile t = gk::nhwc_tile(s);
        ASSERT_GE(t.per_block, 1);
        EXPECT_EQ(groups % t.per_block, 0) << c << " channels, " << groups << " groups";
        EXPECT_EQ(t.width, t.per_block * s.cg());
        EXPECT_LE(t.threads(), gk::kNhwcMaxThreads)
            << c << " channels, " << groups << " groups, " << hw << " px";
        EXPECT_GE(t.rows, 1);
        EXPECT_LE(t.rows, hw);
        EXPECT_EQ(t.blocks(s) * t.per_block, s.n * groups);
        ++shapes;
      }
    }
  }
  EXPECT_GT(shapes, 500);
}

TEST(FusedNorm, WithoutAffineParametersAndInItsOwnType) {
  at::manual_seed(3);
  const at::Tensor x = at::randn({2, 6, 4, 4});
  const at::Tensor y = fused_group_norm(x, 3, at::Tensor(), at::Tensor(), 1e-5, false);
  EXPECT_LT((y - at::group_norm(x, 3)).abs().max().item<double>(), 1e-5);
  EXPECT_EQ(fused_group_norm(x.to(at::kBFloat16), 3, at::Tensor(), at::Tensor(), 1e-5, true).scalar_type(),
            at::kBFloat16);
  // An input in neither layout is normalized as its contiguous copy; NHWC memory as it is, in its own layout.
  const at::Tensor t = at::randn({2, 4, 4, 6}).permute({0, 3, 2, 1});
  ASSERT_FALSE(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(at::allclose(fused_group_norm(t, 3, at::Tensor(), at::Tensor(), 1e-5, false),
                           fused_group_norm(t.contiguous(), 3, at::Tensor(), at::Tensor(), 1e-5, false)));
  const at::Tensor nhwc = at::randn({2, 4, 4, 6}).permute({0, 3, 1, 2});
  const at::Tensor yn = fused_group_norm(nhwc, 3, at::Tensor(), at::Tensor(), 1e-5, true);
  EXPECT_TRUE(yn.is_contiguous(at::MemoryFormat::ChannelsLast));
  // Groups wider than the NHWC kernels' blocks (C/G > 512) are normalized as a contiguous copy.
  const at::Tensor wide = at::randn({1, 1024, 2, 3}).contiguous(at::MemoryFormat::ChannelsLast);
  EXPECT_TRUE(at::allclose(fused_group_norm(wide, 1, at::Tensor(), at::Tensor(), 1e-5, false),
                           at::group_norm(wide, 1), 1e-4, 1e-5));
  EXPECT_TRUE(at::allclose(yn, fused_group_norm(nhwc.contiguous(), 3, at::Tensor(), at::Tensor(), 1e-5, true),
                           1e-5, 1e-6));
}

TEST(FusedNorm, RefusesWhatItCannotNormalize) {
  const at::Tensor x = at::randn({2, 6, 4, 4});
  EXPECT_THROW(fused_group_norm(x, 4, at::Tensor(), at::Tensor(), 1e-5), diffuse::Error);  // 6 channels, 4 groups
  EXPECT_THROW(fused_group_norm(x, 0, at::Tensor(), at::Tensor(), 1e-5), diffuse::Error);
  EXPECT_THROW(fused_group_norm(at::randn({6}), 3, at::Tensor(), at::Tensor(), 1e-5), diffuse::Error);
  EXPECT_THROW(fused_group_norm(x.to(at::kDouble), 3, at::Tensor(), at::Tensor(), 1e-5), diffuse::Error);
  EXPECT_THROW(fused_group_norm(x, 3, at::ones({5}), at::Tensor(), 1e-5), diffuse::Error);
  EXPECT_THROW(fused_group_norm(at::randn({0, 6, 4, 4}), 3, at::Tensor(), at::Tensor(), 1e-5), diffuse::Error);
  EXPECT_THROW(fused_group_norm(x, 3, at::Tensor(), at::Tensor(), 1e-5, false, at::randn({2, 5})), diffuse::Error);
  EXPECT_THROW(fused_group_norm(x, 3, at::Tensor(), at::Tensor(), 1e-5, false, at::ones({2, 6}, at::kInt)),
               diffuse::Error);
  EXPECT_THROW(fused_group_norm(x, 3, at::ones({6}, at::TensorOptions().device(at::kMeta)), at::Tensor(), 1e-5),
               diffuse::Error);  // a parameter on another device
  EXPECT_FALSE(diffuse::nn_detail::fused_group_norm_applies(x.to(at::kHalf)));
  EXPECT_FALSE(diffuse::nn_detail::fused_group_norm_applies(x.permute({0, 2, 3, 1})));
  EXPECT_FALSE(diffuse::nn_detail::fused_group_norm_applies(x.transpose(2, 3)));
  EXPECT_TRUE(diffuse::nn_detail::fused_group_norm_applies(x));
  EXPECT_TRUE(diffuse::nn_detail::fused_group_norm_applies(x.contiguous(at::MemoryFormat::ChannelsLast)));
}

}  // namespace
