// The U-Net: the same function, with the same parameter names, as diffusers' UNet2DModel
// (pixel-space blocks: DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D, UNetMidBlock2D).
//
//   diffuse::UNetConfig cfg = diffuse::unet_config_from_json(nlohmann::json::parse(text));
//   diffuse::UNet2DModel net(cfg);
//   at::Tensor out = net->forward(x, timesteps);              // x [N, C, H, W], timesteps [N] (float or int64)
//   diffuse::UNet2DModel m = diffuse::load_diffusers_unet("path/to/unet");  // config.json + diffusion_pytorch_model.safetensors
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "diffuse/io/safetensors.h"
#include "diffuse/nn/precision.h"

namespace diffuse {

// Mirrors UNet2DModel.__init__'s arguments (same names, same defaults).
struct UNetConfig {
  int64_t sample_size = 32;                    // image side the model was made for
  int64_t in_channels = 3;                     // input channels (SR3-style conditioning adds channels here)
  int64_t out_channels = 3;                    // 2 x image channels for learned variances
  bool center_input_sample = false;            // x -> 2x - 1 first
  std::string time_embedding_type = "positional";
  int64_t freq_shift = 0;                      // sinusoid frequency shift (downscale_freq_shift)
  bool flip_sin_to_cos = true;                 // [cos, sin] instead of [sin, cos]
  std::vector<std::string> down_block_types = {"DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"};
  std::vector<std::string> up_block_types = {"AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"};
  std::vector<int64_t> block_out_channels = {224, 448, 672, 896};
  int64_t layers_per_block = 2;                // resnets per down block (up blocks: +1)
  double mid_block_scale_factor = 1.0;
  int64_t downsample_padding = 1;              // 1: conv pad 1; 0: F.pad(0,1,0,1) then conv pad 0
  std::string downsample_type = "conv";
  std::string upsample_type = "conv";
  double dropout = 0.0;
  std::string act_fn = "silu";
  std::optional<int64_t> attention_head_dim = 8; // channels per head; nullopt: one head of all channels
  int64_t norm_num_groups = 32;
  std::optional<int64_t> attn_norm_num_groups;   // nullopt: norm_num_groups
  double norm_eps = 1e-5;
  std::string resnet_time_scale_shift = "default";
  bool add_attention = true;                   // attention in the mid block
  std::optional<std::string> class_embed_type; // only null (embedding table) is supported
  std::optional<int64_t> num_class_embeds;     // class-conditional when set
  std::optional<int64_t> time_embedding_dim;   // nullopt: 4 x block_out_channels[0]
};

// Reads a diffusers config.json object (unknown keys such as _class_name are ignored; unsupported
// values give input_error naming the key). Writes the same keys back.
UNetConfig unet_config_from_json(const nlohmann::json& j);
nlohmann::json unet_config_to_json(const UNetConfig& cfg);
// Checks a config for what the constructor needs (block counts, supported values, GroupNorm groups
// dividing every normalized channel count, at least one attention head); input_error naming the key.
// Called by unet_config_from_json and by the UNet2DModel constructor.
void validate_unet_config(const UNetConfig& cfg);

class UNet2DModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DModelImpl(const UNetConfig& cfg);
  // x [N, in_channels, H, W]; timesteps [N] or a scalar, float or integer; class_labels [N] int64
  // (required iff num_class_embeds is set). Returns [N, out_channels, H, W].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& timesteps,
                     const at::Tensor& class_labels = at::Tensor());
  const UNetConfig& config() const { return cfg_; }
  int64_t num_parameters() const;
  // Mixed precision of forward (nn/precision.h): convolutions and products run in bf16/fp16 under
  // autocast; the output is returned in the parameters' dtype. Default float32.
  void set_precision(Precision p) { precision_ = p; }
  Precision precision() const { return precision_; }
  // Channels-last activations: forward runs the network on NHWC memory (the convolutions as NHWC kernels,
  // GroupNorm by a layout-keeping composition, attention's heads as views), with the parameters, the input and the
  // returned tensor as before (NCHW). The same function up to the kernels' summation order. Default off: the
  // Tensor-Core convolutions of cuDNN work in NHWC, which NCHW activations reach through transposes; on the CPU it
  // leaves the Winograd path (set_cpu_winograd) for oneDNN's direct NHWC kernels.
  void set_channels_last(bool on) { channels_last_ = on; }
  bool channels_last() const { return channels_last_; }
  // See FrozenWeightsScope.
  void freeze_weights(bool on);
  // This model's share of set_flat_parameter_cast, for forwards that record autograd (default on).
  // Data-parallel training turns it off: its bucketed all-reduce starts while backward runs, and the one
  // cast's backward would hand every weight's gradient over at its very end.
  void set_flat_cast(bool on) { flat_cast_ = on; }

 private:
  // dtype: the parameters' (float32 unless the model was converted).
  at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& timesteps, const at::Tensor& class_labels,
                          at::ScalarType dtype);
  struct Impl;
  UNetConfig cfg_;
  Precision precision_ = Precision::kFloat32;
  bool channels_last_ = false;
  bool flat_cast_ = true;
  std::shared_ptr<Impl> impl_;
};
TORCH_MODULE(UNet2DModel);

// Parameters by their diffusers names (state_dict order).
TensorDict unet_state_dict(UNet2DModelImpl& net);
// Copies tensors into the model. Accepts legacy attention names (query/key/value/proj_attn). Every
// parameter must be present with the right shape; unknown names are an error (input_error naming them).
void unet_load_state_dict(UNet2DModelImpl& net, const TensorDict& tensors, const std::string& context);

// A diffusers UNet2DModel folder: config.json + diffusion_pytorch_model.safetensors.
UNet2DModel load_diffusers_unet(const std::string& dir);
void save_diffusers_unet(UNet2DModelImpl& net, const std::string& dir);

// CPU float32 (no autocast): 3x3 convolutions by Winograd's F(4x4, 3x3) instead of LibTorch's direct convolution;
// off by default (the library then computes what diffusers computes to ~1e-6), the `diffuse` program turns it on.
// Two sets of kernels (set_cpu_winograd_kernel):
// - oneDNN 2.x's, which LibTorch's convolution never selects. Inference 1.3-2.3x faster per convolution on the
//   fmnist U-Net, relative error ~2e-6; training through its forward, backward-data and backward-weights kernels
//   in an autograd function, the fmnist training step ~1.13x faster, gradients within ~1e-6 relative L2. They
//   need oneDNN 2's headers at build time (Debian 12: libdnnl-dev; cpu_winograd_built()) and AVX-512.
// - the project's own (src/nn/winograd_f43.cpp), on any CPU and LibTorch (oneDNN 3.x, in every LibTorch 2.x, has
//   no Winograd kernels): inference, and in training the forward, input-gradient and filters' gradient
//   convolutions. Relative error ~2e-6; the filters' gradient has the same bits on any thread count.
// kAuto takes the own ones where they apply (16 or more channels on both sides), else oneDNN's where this build and
// CPU have them for the shape. cpu_winograd_calls counts the convolutions either computed.
enum class CpuWinogradKernel { kAuto, kOneDnn, kOwn };
void set_cpu_winograd(bool on);
bool cpu_winograd();
void set_cpu_winograd_kernel(CpuWinogradKernel kernel);
CpuWinogradKernel cpu_winograd_kernel();
bool cpu_winograd_built();  // oneDNN 2's Winograd kernels; the own ones are always built
int64_t cpu_winograd_calls();

// Mixed precision (autocast to bf16 or fp16): GroupNorm on the reduced-precision activations, its output in that
// precision (the kernels accumulate the statistics in float32; the affine parameters are cast), instead of
// autocast's float32 GroupNorm. Saves the two casts around every normalization, half of its memory traffic and half
// of what it keeps for the backward pass; the network's output moves by about bf16's rounding. Off by default
// until it is measured on a GPU (bench_train_speed --reduced-norm 1; on this CPU LibTorch's bf16 GroupNorm
// kernel is no faster than its float32 one).
void set_reduced_precision_norm(bool on);
bool reduced_precision_norm();

// Mixed precision (set_precision) on parameters that lie in one buffer, as a training run keeps them
// (FlatParameters): each forward casts the convolutions' and linear layers' weights and biases to autocast's
// type by one kernel over the buffer, and backward casts their gradients back by one concatenation and one
// cast, instead of autocast's cast per parameter each way (~150 small kernels each way in the fmnist U-Net's
// training step, ~20% of its kernels). The same values bit for bit. On by default; off leaves the casts to
// autocast (bench_train_speed
// --flat-cast 0). flat_parameter_casts counts the forwards that cast at once (for tests).
void set_flat_parameter_cast(bool on);
bool flat_parameter_cast();
int64_t flat_parameter_casts();

// For a run of forwards during which the parameters do not change (a sampling run): while one lives, the
// first forward of `net` under mixed precision without autograd casts the convolutions' and linear layers'
// weights and biases, and the later ones reuse them, where autocast would cast every parameter in every
// forward (186 casts per evaluation of the fmnist U-Net: ~8 ms on two CPU cores; on a GPU, a third of the
// kernels of a small batch's evaluation). The same values. The caller must not change the parameters while
// one lives (the optimizer's CPU pass writes them without telling autograd's version counters, so no check
// could see it). Nests; off with set_flat_parameter_cast(false). frozen_weight_casts counts the casts made
// (for tests).
class FrozenWeightsScope {
 public:
  explicit FrozenWeightsScope(UNet2DModelImpl& net);
  ~FrozenWeightsScope();
  FrozenWeightsScope(const FrozenWeightsScope&) = delete;
  FrozenWeightsScope& operator=(const FrozenWeightsScope&) = delete;

 private:
  UNet2DModelImpl& net_;
};
int64_t frozen_weight_casts();

// GroupNorm and the SiLU after it on CUDA by this project's fused kernels (src/nn/cuda/group_norm.cu) instead
// of LibTorch's GroupNorm, SiLU and autocast's casts around them: per normalization one kernel forward
// (statistics by two passes, then the affine map and SiLU) and one backward (the pre-activation recomputed
// from the kept input), float32 arithmetic on float32 or bfloat16 activations, the output in the activations'
// type. Applies to NCHW and, in a channels-last forward, NHWC activations (a kernel pair for each layout) on
// CUDA in a build with the kernels (fused_norm_built(): a CUDA LibTorch and nvcc); elsewhere the other paths
// run. With it, on CUDA, ResnetBlock2D's first convolution leaves its bias to the normalization's addend, and
// the attention computes q, k, v as one 1x1 convolution (session 17; neither timed on a GPU yet). Off by
// default in the library (bench_train_speed --fused-norm 1); the program turns it on (faster in every
// configuration session 16 timed on an H100; DIFFUSE_CUDA_FUSED_NORM=0).
void set_fused_norm(bool on);
bool fused_norm();
bool fused_norm_built();

// true when the build can use at::scaled_dot_product_attention (LibTorch 2.x). The U-Net's attention blocks take
// it on CUDA, and on a CPU only where the oneDNN sgemm of the project's own attention products is not found.
bool unet_has_sdpa();
// Attention core on [B, heads, L, d] tensors: softmax(q k^T * scale) v. use_sdpa selects the fused
// kernel where available (ignored on 1.13). Exposed so tests can compare both paths.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool use_sdpa);

}  // namespace diffuse
