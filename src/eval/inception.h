// pytorch-fid's feature network: Inception-v3 as TensorFlow's 2015-12-05 graph computes it (the network
// behind the FID figures papers report). Parameter names are torchvision's `Inception3` state_dict names, so
// the weights pytorch-fid publishes load once converted to safetensors (bench/fid_inception.py convert).
//
// Input: float RGB [N, 3, 299, 299] in [-1, 1]. Output: the 2048 pool features and the classifier's logits
// (1008 classes in that graph). Inference only: BatchNorm runs on its stored statistics, folded into the
// convolution before it.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace diffuse::detail {

// Convolution without bias -> BatchNorm (eps 1e-3) -> ReLU; torchvision's BasicConv2d ("conv", "bn").
struct ConvBnReluImpl : torch::nn::Module {
  ConvBnReluImpl(int64_t in, int64_t out, std::array<int64_t, 2> kernel,
                 std::array<int64_t, 2> stride = {1, 1}, std::array<int64_t, 2> padding = {0, 0});
  at::Tensor forward(const at::Tensor& x);

  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  std::array<int64_t, 2> stride, padding;
};
TORCH_MODULE(ConvBnRelu);

// One of the Mixed_* blocks: parallel branches concatenated along the channels.
struct MixedBlock : torch::nn::Module {
  virtual at::Tensor forward(const at::Tensor& x) = 0;
};

struct FidInceptionImpl : torch::nn::Module {
  explicit FidInceptionImpl(int64_t num_classes = 1008);
  // {features [N, 2048], logits [N, num_classes]}
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x);

  ConvBnRelu conv1a{nullptr}, conv2a{nullptr}, conv2b{nullptr}, conv3b{nullptr}, conv4a{nullptr};
  std::vector<std::shared_ptr<MixedBlock>> mixed;  // Mixed_5b ... Mixed_7c, in order
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(FidInception);

constexpr int64_t kFidInceptionSide = 299;
constexpr int64_t kFidInceptionFeatures = 2048;

}  // namespace diffuse::detail
