// 3x3 convolutions (stride 1, padding 1) with one input or one output channel on the CPU in float32: the U-Net's
// first and last. Direct loops over image rows, vectorized over columns; training goes through an autograd function
// whose filters' gradient adds the images in order. Per call at batch 64 (bench_cpu_kernels, session 14) the last
// convolution (64 -> 1 channel at 28x28) takes 0.96 ms against oneDNN's 2.61 in inference and 4.0 against 8.1 ms in
// training; the first (1 -> 64) 1.12 against 0.59 ms and 4.3 against 4.2 ms, so the U-Net leaves that one to oneDNN.
// (Session 13 had measured the first as 3-5x faster here, most likely from a profiler trace, whose per-operator
// times on this machine ran up to 15x the untraced ones.)
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <vector>

#include "cpu_clones.h"
#include "diffuse/nn/precision.h"
#include "nn/blocks.h"

namespace diffuse {
namespace nn_detail {

namespace {

// out[r][c] += sum over taps (dy, dx) of f[3 dy + dx] in[r + dy - 1][c + dx - 1] (zero outside): one h x w plane.
DIFFUSE_CPU_CLONES void correlate_add(const float* __restrict__ in, int64_t h, int64_t w, const float* __restrict__ f,
                                      float* __restrict__ out) {
  for (int64_t r = 0; r < h; ++r) {
    float* o = out + r * w;
    for (int64_t dy = 0; dy < 3; ++dy) {
      const int64_t rr = r + dy - 1;
      if (rr < 0 || rr >= h) continue;
      const float* i = in + rr * w;
      const float f0 = f[3 * dy], f1 = f[3 * dy + 1], f2 = f[3 * dy + 2];
      if (w == 1) {
        o[0] += f1 * i[0];
        continue;
      }
      o[0] += f1 * i[0] + f2 * i[1];
      for (int64_t c = 1; c + 1 < w; ++c) o[c] += f0 * i[c - 1] + f1 * i[c] + f2 * i[c + 1];
      o[w - 1] += f0 * i[w - 2] + f1 * i[w - 1];
    }
  }
}

// acc[3 dy + dx][c] += sum over rows r of gy[r][c] in[r + dy - 1][c + dx - 1], one plane pair: the taps' gradient
// column by column (acc: 9 rows of w), summed over the columns once all images are in.
DIFFUSE_CPU_CLONES void correlate_taps(const float* __restrict__ in, const float* __restrict__ gy, int64_t h, int64_t w,
                                       float* __restrict__ acc) {
  for (int64_t r = 0; r < h; ++r) {
    const float* gr = gy + r * w;
    for (int64_t dy = 0; dy < 3; ++dy) {
      const int64_t rr = r + dy - 1;
      if (rr < 0 || rr >= h) continue;
      const float* ir = in + rr * w;
      float* a0 = acc + 3 * dy * w;
      float* a1 = a0 + w;
      float* a2 = a1 + w;
      for (int64_t c = 1; c < w; ++c) a0[c] += gr[c] * ir[c - 1];
      for (int64_t c = 0; c < w; ++c) a1[c] += gr[c] * ir[c];
      for (int64_t c = 0; c + 1 < w; ++c) a2[c] += gr[c] * ir[c + 1];
    }
  }
}

// y [N, K, H, W] = x [N, C, H, W] (contiguous) correlated with f [K, C, 3, 3] (contiguous), plus b [K] when given;
// output planes in parallel, each a sum over the C input planes in order.
at::Tensor thin_forward(const at::Tensor& x, const at::Tensor& f, const at::Tensor& b) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), k = f.size(0);
  at::Tensor y = at::empty({n, k, h, w}, x.options());
  const at::Tensor bc = b.defined() ? b.contiguous() : at::Tensor();
  const float* px = x.data_ptr<float>();
  const float* pf = f.data_ptr<float>();
  const float* pb = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* py = y.data_ptr<float>();
  const int64_t plane = h * w;
  at::parallel_for(0, n * k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t img = p / k, out = p % k;
      float* o = py + p * plane;
      std::fill(o, o + plane, pb ? pb[out] : 0.0f);
      for (int64_t ch = 0; ch < c; ++ch) correlate_add(px + (img * c + ch) * plane, h, w, pf + (out * c + ch) * 9, o);
    }
  });
  return y;
}

// The filters' gradient [K, C, 3, 3]: (output, input) channel pairs in parallel, each adding the images in order
// column by column, then the columns.
at::Tensor thin_filters_grad(const at::Tensor& x, const at::Tensor& gy) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), k = gy.size(1);
  at::Tensor g = at::empty({k, c, 3, 3}, x.options());
  const float* px = x.data_ptr<float>();
  const float* pg = gy.data_ptr<float>();
  float* pw = g.data_ptr<float>();
  const int64_t plane = h * w;
  at::parallel_for(0, k * c, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(9 * w));
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t out = pair / c, ch = pair % c;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t img = 0; img < n; ++img) {
        correlate_taps(px + (img * c + ch) * plane, pg + (img * k + out) * plane, h, w, acc.data());
      }
      for (int64_t t = 0; t < 9; ++t) {
        float s = 0.0f;
        for (int64_t col = 0; col < w; ++col) s += acc[static_cast<size_t>(t * w + col)];
        pw[pair * 9 + t] = s;
      }
    }
  });
  return g;
}

struct ThinConv3x3Fn : public torch::autograd::Function<ThinConv3x3Fn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w,
                            const at::Tensor& b) {
    const at::Tensor x = x_in.contiguous();
    save_conv3x3(ctx, x, w, b);
    return thin_forward(x, w.contiguous(), b);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto [x, w, gy, has_bias] = saved_conv3x3(ctx, grads);
    at::Tensor gx, gw, gb;
    // d/dx: the output's gradient correlated with the filters flipped and transposed.
    if (ctx->needs_input_grad(0)) gx = thin_forward(gy, w.flip({2, 3}).transpose(0, 1).contiguous(), at::Tensor());
    if (ctx->needs_input_grad(1)) gw = thin_filters_grad(x, gy);
    if (has_bias && ctx->needs_input_grad(2)) gb = gy.sum({0, 2, 3});
    return {gx, gw, gb};
  }
};

}  // namespace

bool thin_conv3x3_applies(const at::Tensor& x, const at::Tensor& w) {
  return x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == at::kFloat &&
         w.scalar_type() == at::kFloat && x.layout() == at::kStrided && w.layout() == at::kStrided &&
         !autocast_active(c10::Device(c10::kCPU)) && x.dim() == 4 && w.dim() == 4 && w.size(2) == 3 &&
         w.size(3) == 3 && w.size(1) == x.size(1) && (x.size(1) == 1 || w.size(0) == 1);
}

at::Tensor thin_conv3x3(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const bool record = autograd_records(x, w, b);
  // LibTorch 1.x's autograd functions take no undefined tensor: a missing bias is a zero one (its gradient unused).
  if (record) return ThinConv3x3Fn::apply(x, w, b.defined() ? b : at::zeros({w.size(0)}, w.options().requires_grad(false)));
  at::NoGradGuard no_grad;
  return thin_forward(x.contiguous(), w.contiguous(), b);
}

}  // namespace nn_detail
}  // namespace diffuse
