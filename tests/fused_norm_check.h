// Shared by nn_fused_norm_test (the block program on the CPU) and cuda_test (the CUDA kernels): fused_group_norm
// against LibTorch's GroupNorm (+ SiLU) in float64 on the same inputs, forward and backward.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "nn/blocks.h"
#include "test_util.h"

namespace fused_norm_check {

using diffuse_test::rel_l2;

struct Case {
  std::vector<int64_t> shape;  // [N, C, ...]
  int64_t groups;
  double offset = 0.0, spread = 1.0;  // x = offset + spread * N(0, 1)
};

struct Errors {
  double y, dx, dw, db, da;  // relative L2 distances from the float64 reference (da: the addend's gradient, or 0)
};

// x, the upstream gradient and the parameters drawn from `seed`; x and the gradient hold values of `dtype`
// exactly, so the reference sees what the kernels see. With `addend`: the normalization of x + a[:, :, None,
// ...] for a drawn [N, C] float32 addend, whose gradient is checked too; with `strided`, a is a view of
// columns 1 ... C of an [N, C + 3] tensor (rows C + 3 apart, as the U-Net's batched time projections give
// them). With `nhwc`: x and the upstream gradient in channels-last memory (the kernels' NHWC block program),
// whose layout the output and x's gradient must keep.
inline Errors errors(const Case& k, at::ScalarType dtype, bool silu, const at::Device& device,
                     bool addend = false, uint64_t seed = 0, bool nhwc = false, bool strided = false) {
  at::manual_seed(seed);
  const int64_t c = k.shape[1];
  const double eps = 1e-5;
  const at::Tensor x = (at::randn(k.shape, at::kDouble) * k.spread + k.offset).to(dtype);
  const at::Tensor gy = at::randn(k.shape).to(dtype);
  const at::Tensor w = at::randn({c}) * 0.5 + 1.0, b = at::randn({c}) * 0.3;
  const int64_t a_cols = strided ? c + 3 : c, a_first = strided ? 1 : 0;
  const at::Tensor a_all = addend ? at::randn({k.shape[0], a_cols}) * k.spread : at::Tensor();
  const at::Tensor a = addend ? a_all.narrow(1, a_first, c) : at::Tensor();
  std::vector<int64_t> broadcast{k.shape[0], c};
  broadcast.resize(k.shape.size(), 1);

  // The reference normalizes x + a as rounded once to float32, as the kernels add them (where x is 1000 times the
  // spread, that rounding alone is ~1e-5 of the spread); its gradient goes to x as it is and, summed over the
  // pixels, to a.
  const at::Tensor xd = (addend ? x.to(at::kFloat) + a.view(broadcast) : x).to(at::kDouble).requires_grad_();
  const at::Tensor wd = w.to(at::kDouble).requires_grad_(), bd = b.to(at::kDouble).requires_grad_();
  at::Tensor yd = at::group_norm(xd, k.groups, wd, bd, eps);
  if (silu) yd = at::silu(yd);
  (yd * gy.to(at::kDouble)).sum().backward();
  std::vector<int64_t> pixels;
  for (int64_t dim = 2; dim < static_cast<int64_t>(k.shape.size()); ++dim) pixels.push_back(dim);
  const at::Tensor da_ref = addend ? xd.grad().sum(pixels) : at::Tensor();

  const at::MemoryFormat layout = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor xf = x.to(device).contiguous(layout).requires_grad_(), wf = w.to(device).requires_grad_(),
                   bf = b.to(device).requires_grad_();
  const at::Tensor af_all = addend ? a_all.to(device).requires_grad_() : at::Tensor();
  const at::Tensor af = addend ? af_all.narrow(1, a_first, c) : at::Tensor();
  if (strided) EXPECT_FALSE(af.is_contiguous());
  const at::Tensor yf = diffuse::nn_detail::fused_group_norm(xf, k.groups, wf, bf, eps, silu, af);
  // The upstream gradient reaches the function in x's layout: y * gy with gy laid out so.
  (yf * gy.to(device).contiguous(layout)).to(at::kFloat).sum().backward();
  if (nhwc) {
    EXPECT_TRUE(yf.is_contiguous(layout)) << "the output left NHWC memory";
    EXPECT_TRUE(xf.grad().is_contiguous(layout)) << "x's gradient left NHWC memory";
  }
  return {rel_l2(yf.detach(), yd.detach()), rel_l2(xf.grad(), xd.grad()), rel_l2(wf.grad(), wd.grad()),
          rel_l2(bf.grad(), bd.grad()), addend ? rel_l2(af_all.grad().narrow(1, a_first, c), da_ref) : 0.0};
}

// The shapes: fewer pixels than a block's threads (the element cursor wraps channels), the fmnist U-Net's
// first level, a pixel count that is not a multiple of the threads, one pixel per channel (six per group:
// with two, x^ is
// +-1 and dx cancels to what eps leaves, where no relative bound holds), a mean 1000 times the spread, a [N,
// C, L] input, and one group of 64 channels (an NHWC block of one group, 64 lanes wide). In NHWC memory the
// blocks take 4 groups of 2 channels (8 lanes, 35 rows: one pixel per thread), 16 (32 lanes, 32 rows), 3 of 4
// (12 lanes, 85 rows: 1,020 threads), 8 of 2 (16 lanes, 64 rows) and one of 64 (64 lanes, 15 rows);
// [4, 6, 1, 1] is NCHW memory as well and keeps the NCHW program.
inline std::vector<Case> cases() {
  return {{{2, 8, 5, 7}, 4}, {{3, 64, 28, 28}, 32},           {{2, 12, 10, 30}, 3},
          {{4, 6, 1, 1}, 1}, {{2, 16, 9, 9}, 8, 1000.0, 1.0}, {{2, 8, 17}, 2},
          {{2, 64, 3, 5}, 1}};
}

// Runs every case in both types, with and without SiLU, prints the distances and checks them. float32 arithmetic
// throughout (measured on the CPU: at most 1.8e-7 for y and dx, 4.5e-7 for the parameters' gradients); in bfloat16
// y and dx are rounded once to 8 significant bits (relative RMS ~1.6e-3), the parameters' gradients stay float32 sums.
// With an addend, its gradient (up to 1.5e-6 on the CPU) comes from a closed form that loses a few digits where the
// mean is 1000 times the spread.
inline void check_all_cases(const at::Device& device, bool nhwc = false) {
  for (const auto& k : cases()) {
    if (nhwc && k.shape.size() != 4) continue;
    for (int addend : {0, 1, 2}) {  // none, contiguous, rows apart
      for (bool silu : {false, true}) {
        for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
          const Errors e = errors(k, dtype, silu, device, addend > 0, 0, nhwc, addend == 2);
          std::printf(
              "  GroupNorm %-4s %s %-16s G=%-2lld offset %-4g addend %d silu %d %-8s y %.2e dx %.2e dw %.2e "
              "db %.2e da %.2e\n",
              device.str().c_str(), nhwc ? "NHWC" : "NCHW", diffuse::nn_detail::shape_str(k.shape).c_str(),
              static_cast<long long>(k.groups), k.offset, addend, silu, c10::toString(dtype), e.y, e.dx, e.dw,
              e.db, e.da);
          EXPECT_LT(e.y, dtype == at::kFloat ? 1e-6 : 3e-3);
          EXPECT_LT(e.dx, dtype == at::kFloat ? 1e-6 : 3e-3);
          EXPECT_LT(e.dw, 2e-6);
          EXPECT_LT(e.db, 2e-6);
          EXPECT_LT(e.da, 5e-6);  // a closed form over the channel's sums: 1.5e-6 at the offset of 1000 here
        }
      }
    }
  }
}

}  // namespace fused_norm_check
