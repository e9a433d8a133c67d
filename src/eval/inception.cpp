// pytorch-fid's Inception-v3 (TensorFlow's 2015-12-05 graph): see inception.h.
//
// Against torchvision's Inception-v3 the graph differs only in its pooling branches: the 3x3 average pools
// of Mixed_5b-d, Mixed_6b-e and Mixed_7b leave the zero padding out of the average, and Mixed_7c pools
// with a 3x3 max. tests/eval_inception_test.cpp checks the whole function against bench/fid_inception.py,
// which builds the network from torchvision's own blocks.
#include "inception.h"

#include <ATen/ATen.h>

#include <string>

namespace diffuse::detail {
namespace {

using Pair = std::array<int64_t, 2>;

at::Tensor avg_pool_excluding_padding(const at::Tensor& x) {
  return at::avg_pool2d(x, {3, 3}, {1, 1}, {1, 1}, /*ceil_mode=*/false, /*count_include_pad=*/false);
}

at::Tensor max_pool_stride2(const at::Tensor& x) { return at::max_pool2d(x, {3, 3}, {2, 2}); }

// Mixed_5b-d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1.
struct BlockA : MixedBlock {
  ConvBnRelu b1, b5_1, b5_2, d1, d2, d3, pool;
  BlockA(int64_t in, int64_t pool_features)
      : b1(register_module("branch1x1", ConvBnRelu(in, 64, Pair{1, 1}))),
        b5_1(register_module("branch5x5_1", ConvBnRelu(in, 48, Pair{1, 1}))),
        b5_2(register_module("branch5x5_2", ConvBnRelu(48, 64, Pair{5, 5}, Pair{1, 1}, Pair{2, 2}))),
        d1(register_module("branch3x3dbl_1", ConvBnRelu(in, 64, Pair{1, 1}))),
        d2(register_module("branch3x3dbl_2", ConvBnRelu(64, 96, Pair{3, 3}, Pair{1, 1}, Pair{1, 1}))),
        d3(register_module("branch3x3dbl_3", ConvBnRelu(96, 96, Pair{3, 3}, Pair{1, 1}, Pair{1, 1}))),
        pool(register_module("branch_pool", ConvBnRelu(in, pool_features, Pair{1, 1}))) {}
  at::Tensor forward(const at::Tensor& x) override {
    return at::cat({b1(x), b5_2(b5_1(x)), d3(d2(d1(x))), pool(avg_pool_excluding_padding(x))}, 1);
  }
};

// Mixed_6a: 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | max pool stride 2.
struct BlockB : MixedBlock {
  ConvBnRelu b3, d1, d2, d3;
  explicit BlockB(int64_t in)
      : b3(register_module("branch3x3", ConvBnRelu(in, 384, Pair{3, 3}, Pair{2, 2}))),
        d1(register_module("branch3x3dbl_1", ConvBnRelu(in, 64, Pair{1, 1}))),
        d2(register_module("branch3x3dbl_2", ConvBnRelu(64, 96, Pair{3, 3}, Pair{1, 1}, Pair{1, 1}))),
        d3(register_module("branch3x3dbl_3", ConvBnRelu(96, 96, Pair{3, 3}, Pair{2, 2}))) {}
  at::Tensor forward(const at::Tensor& x) override {
    return at::cat({b3(x), d3(d2(d1(x))), max_pool_stride2(x)}, 1);
  }
};

// Mixed_6b-e, factorized 7x7: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1.
struct BlockC : MixedBlock {
  ConvBnRelu b1, s1, s2, s3, d1, d2, d3, d4, d5, pool;
  BlockC(int64_t in, int64_t c7)
      : b1(register_module("branch1x1", ConvBnRelu(in, 192, Pair{1, 1}))),
        s1(register_module("branch7x7_1", ConvBnRelu(in, c7, Pair{1, 1}))),
        s2(register_module("branch7x7_2", ConvBnRelu(c7, c7, Pair{1, 7}, Pair{1, 1}, Pair{0, 3}))),
        s3(register_module("branch7x7_3", ConvBnRelu(c7, 192, Pair{7, 1}, Pair{1, 1}, Pair{3, 0}))),
        d1(register_module("branch7x7dbl_1", ConvBnRelu(in, c7, Pair{1, 1}))),
        d2(register_module("branch7x7dbl_2", ConvBnRelu(c7, c7, Pair{7, 1}, Pair{1, 1}, Pair{3, 0}))),
        d3(register_module("branch7x7dbl_3", ConvBnRelu(c7, c7, Pair{1, 7}, Pair{1, 1}, Pair{0, 3}))),
        d4(register_module("branch7x7dbl_4", ConvBnRelu(c7, c7, Pair{7, 1}, Pair{1, 1}, Pair{3, 0}))),
        d5(register_module("branch7x7dbl_5", ConvBnRelu(c7, 192, Pair{1, 7}, Pair{1, 1}, Pair{0, 3}))),
        pool(register_module("branch_pool", ConvBnRelu(in, 192, Pair{1, 1}))) {}
  at::Tensor forward(const at::Tensor& x) override {
    return at::cat({b1(x), s3(s2(s1(x))), d5(d4(d3(d2(d1(x))))), pool(avg_pool_excluding_padding(x))}, 1);
  }
};

// Mixed_7a: 1x1 -> 3x3 stride 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2 | max pool stride 2.
struct BlockD : MixedBlock {
  ConvBnRelu a1, a2, s1, s2, s3, s4;
  explicit BlockD(int64_t in)
      : a1(register_module("branch3x3_1", ConvBnRelu(in, 192, Pair{1, 1}))),
        a2(register_module("branch3x3_2", ConvBnRelu(192, 320, Pair{3, 3}, Pair{2, 2}))),
        s1(register_module("branch7x7x3_1", ConvBnRelu(in, 192, Pair{1, 1}))),
        s2(register_module("branch7x7x3_2", ConvBnRelu(192, 192, Pair{1, 7}, Pair{1, 1}, Pair{0, 3}))),
        s3(register_module("branch7x7x3_3", ConvBnRelu(192, 192, Pair{7, 1}, Pair{1, 1}, Pair{3, 0}))),
        s4(register_module("branch7x7x3_4", ConvBnRelu(192, 192, Pair{3, 3}, Pair{2, 2}))) {}
  at::Tensor forward(const at::Tensor& x) override {
    return at::cat({a2(a1(x)), s4(s3(s2(s1(x)))), max_pool_stride2(x)}, 1);
  }
};

// Mixed_7b/c, expanded: 1x1 | 1x1 -> (1x3 | 3x1) | 1x1 -> 3x3 -> (1x3 | 3x1) | pool -> 1x1. Mixed_7b pools
// with an average leaving the padding out, Mixed_7c with a max.
struct BlockE : MixedBlock {
  ConvBnRelu b1, a1, a2a, a2b, d1, d2, d3a, d3b, pool;
  bool max_pool;
  BlockE(int64_t in, bool max_pool)
      : b1(register_module("branch1x1", ConvBnRelu(in, 320, Pair{1, 1}))),
        a1(register_module("branch3x3_1", ConvBnRelu(in, 384, Pair{1, 1}))),
        a2a(register_module("branch3x3_2a", ConvBnRelu(384, 384, Pair{1, 3}, Pair{1, 1}, Pair{0, 1}))),
        a2b(register_module("branch3x3_2b", ConvBnRelu(384, 384, Pair{3, 1}, Pair{1, 1}, Pair{1, 0}))),
        d1(register_module("branch3x3dbl_1", ConvBnRelu(in, 448, Pair{1, 1}))),
        d2(register_module("branch3x3dbl_2", ConvBnRelu(448, 384, Pair{3, 3}, Pair{1, 1}, Pair{1, 1}))),
        d3a(register_module("branch3x3dbl_3a", ConvBnRelu(384, 384, Pair{1, 3}, Pair{1, 1}, Pair{0, 1}))),
        d3b(register_module("branch3x3dbl_3b", ConvBnRelu(384, 384, Pair{3, 1}, Pair{1, 1}, Pair{1, 0}))),
        pool(register_module("branch_pool", ConvBnRelu(in, 192, Pair{1, 1}))),
        max_pool(max_pool) {}
  at::Tensor forward(const at::Tensor& x) override {
    const at::Tensor a = a1(x), d = d2(d1(x));
    const at::Tensor pooled =
        max_pool ? at::max_pool2d(x, {3, 3}, {1, 1}, {1, 1}) : avg_pool_excluding_padding(x);
    return at::cat({b1(x), a2a(a), a2b(a), d3a(d), d3b(d), pool(pooled)}, 1);
  }
};

}  // namespace

ConvBnReluImpl::ConvBnReluImpl(int64_t in, int64_t out, std::array<int64_t, 2> kernel,
                               std::array<int64_t, 2> stride, std::array<int64_t, 2> padding)
    : stride(stride), padding(padding) {
  conv = register_module(
      "conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, {kernel[0], kernel[1]}).bias(false)));
  bn = register_module("bn", torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(out).eps(1e-3)));
}

at::Tensor ConvBnReluImpl::forward(const at::Tensor& x) {
  // BatchNorm on its stored statistics is an affine map per channel: folded into the convolution's weights
  // and bias, it costs no pass over the activations.
  const at::Tensor scale = bn->weight / at::sqrt(bn->running_var + bn->options.eps());
  const at::Tensor weight = conv->weight * scale.view({-1, 1, 1, 1});
  const at::Tensor bias = bn->bias - bn->running_mean * scale;
  return at::conv2d(x, weight, bias, stride, padding).relu_();
}

FidInceptionImpl::FidInceptionImpl(int64_t num_classes) {
  conv1a = register_module("Conv2d_1a_3x3", ConvBnRelu(3, 32, Pair{3, 3}, Pair{2, 2}));
  conv2a = register_module("Conv2d_2a_3x3", ConvBnRelu(32, 32, Pair{3, 3}));
  conv2b = register_module("Conv2d_2b_3x3", ConvBnRelu(32, 64, Pair{3, 3}, Pair{1, 1}, Pair{1, 1}));
  conv3b = register_module("Conv2d_3b_1x1", ConvBnRelu(64, 80, Pair{1, 1}));
  conv4a = register_module("Conv2d_4a_3x3", ConvBnRelu(80, 192, Pair{3, 3}));
  auto add = [&](const std::string& name, std::shared_ptr<MixedBlock> block) {
    mixed.push_back(register_module(name, std::move(block)));
  };
  add("Mixed_5b", std::make_shared<BlockA>(192, 32));
  add("Mixed_5c", std::make_shared<BlockA>(256, 64));
  add("Mixed_5d", std::make_shared<BlockA>(288, 64));
  add("Mixed_6a", std::make_shared<BlockB>(288));
  add("Mixed_6b", std::make_shared<BlockC>(768, 128));
  add("Mixed_6c", std::make_shared<BlockC>(768, 160));
  add("Mixed_6d", std::make_shared<BlockC>(768, 160));
  add("Mixed_6e", std::make_shared<BlockC>(768, 192));
  add("Mixed_7a", std::make_shared<BlockD>(768));
  add("Mixed_7b", std::make_shared<BlockE>(1280, false));
  add("Mixed_7c", std::make_shared<BlockE>(2048, true));
  fc = register_module("fc", torch::nn::Linear(kFidInceptionFeatures, num_classes));
}

std::pair<at::Tensor, at::Tensor> FidInceptionImpl::forward(const at::Tensor& input) {
  at::Tensor x = max_pool_stride2(conv2b(conv2a(conv1a(input))));  // 299 -> 149 -> 147 -> 73
  x = max_pool_stride2(conv4a(conv3b(x)));                         // 73 -> 71 -> 35
  for (const auto& block : mixed) x = block->forward(x);           // 35 -> 17 -> 8, 2048 channels
  at::Tensor features = x.mean({2, 3});
  return {features, fc(features)};
}

}  // namespace diffuse::detail
