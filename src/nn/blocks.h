// Private building blocks of the U-Net, registered under diffusers' module names so that
// named_parameters() gives diffusers' state_dict keys (ResnetBlock2D, Attention, Downsample2D,
// Upsample2D, DownBlock2D/AttnDownBlock2D, UpBlock2D/AttnUpBlock2D, UNetMidBlock2D).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "diffuse/nn/unet.h"

namespace torch {
namespace autograd {
struct AutogradContext;
}  // namespace autograd
}  // namespace torch

namespace diffuse {
namespace nn_detail {

// A 3x3 convolution with stride 1 and padding 1 (the module's): on a CPU in float32 with set_cpu_winograd(true)
// through Winograd kernels (inference, or training through an autograd function; set_cpu_winograd_kernel says
// whose), else the module's own forward (src/nn/winograd.cpp). In a channels-last forward: the module's
// forward, its output in NHWC memory.
at::Tensor conv3x3(torch::nn::Conv2d conv, const at::Tensor& x);

// The project's own Winograd F(4x4, 3x3) convolution (src/nn/winograd_f43.cpp): stride 1, padding 1, float32 on
// the CPU, at least 16 input and 16 output channels. Differentiable: an autograd function when autograd records.
bool f43_applies(const at::Tensor& x, const at::Tensor& w);
at::Tensor conv3x3_f43(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
// Whether autograd records an op on x, w and b (any may be undefined): grad mode on and one of them requiring grad.
bool autograd_records(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
// 3x3 convolutions (stride 1, padding 1) with one input or one output channel (the U-Net's first and last), CPU
// float32 (src/nn/conv3x3_thin.cpp): direct loops, vectorized over columns; through autograd when it records. The
// U-Net takes them for its last (conv3x3 in winograd.cpp); for the first oneDNN's convolution is faster.
bool thin_conv3x3_applies(const at::Tensor& x, const at::Tensor& w);
at::Tensor thin_conv3x3(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
// The 3x3 convolutions' autograd functions' shared bookkeeping: forward saves the input, the filters and whether
// there is a bias; backward gets them back with the output's gradient made contiguous.
struct Conv3x3Saved {
  at::Tensor x, w, gy;
  bool has_bias = false;
};
void save_conv3x3(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
Conv3x3Saved saved_conv3x3(torch::autograd::AutogradContext* ctx, const std::vector<at::Tensor>& grads);

// "[2, 3, 4]": a shape for error messages.
std::string shape_str(at::IntArrayRef sizes);

// SiLU; in place when no graph is recorded (the input is a temporary of the caller).
at::Tensor silu_temp(at::Tensor x);

// GroupNorm under mixed precision (bf16 activations, float32 parameters): in float32 (the activations cast
// up, as autocast does on CUDA; LibTorch's CPU kernel takes one dtype), or with
// set_reduced_precision_norm(true) on the activations' own type with the affine parameters cast down (the
// kernels accumulate the statistics in float32). Plain norm->forward otherwise. With channels-last
// activations (a U-Net forward with set_channels_last(true), ChannelsLastScope), an input in NHWC memory is
// normalized by the fused kernels (set_fused_norm) or group_norm_nhwc, and stays in NHWC memory.
at::Tensor group_norm(torch::nn::GroupNorm& norm, const at::Tensor& x);
// SiLU(group_norm(norm, x)); in a channels-last forward one autograd function that keeps x instead of the
// pre-activation for the backward pass.
at::Tensor group_norm_silu(torch::nn::GroupNorm& norm, const at::Tensor& x);

// GroupNorm of x [N, C, H, W] in channels-last memory, its output in the same layout and in `dtype` (x is cast to it
// first). LibTorch's CUDA GroupNorm (up to 2.11 at least) makes its input contiguous and returns NCHW, which would
// undo channels-last before every convolution. Here: statistics in float32 by ATen reductions, one multiply-add
// pass in x's layout, and an autograd function whose backward is GroupNorm's formula in float32. weight and bias
// ([C], any floating type) may be undefined. With silu: SiLU of that, the pre-activation recomputed in the backward
// pass rather than kept.
at::Tensor group_norm_nhwc(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, at::ScalarType dtype, bool silu = false);
int64_t group_norm_nhwc_calls();  // how many times group_norm_nhwc ran in this process (for tests)
// How many attention blocks computed q, k, v as one convolution (set_fused_norm's paths; for tests).
int64_t fused_qkv_calls();

// Mixed precision's copies of float32 parameters for one forward, where all of `params` lie in one buffer
// (in_one_buffer: FlatParameters' layout in training): the range covering them cast to `dtype` by one kernel,
// each result in its parameter's sizes and strides; backward one concatenation of the incoming gradients and
// one cast back, each parameter's gradient in its parameter's layout. The values of autocast's per-parameter
// casts, bit for bit, in two kernels each way instead of one per parameter. Empty when the parameters are not
// in one buffer.
bool in_one_buffer(const std::vector<at::Tensor>& params);
std::vector<at::Tensor> cast_parameters_in_one_buffer(const std::vector<at::Tensor>& params,
                                                      at::ScalarType dtype);
// Whether a U-Net forward on `device` takes the fused paths (set_fused_norm; CUDA, or the CPU in tests): the
// time embedding's projections of all its resnets as one GEMM in the parameters' type with conv1's biases
// folded in (TimeAddendsScope), read by the fused normalization as its addend, and the attention's q, k, v as
// one convolution.
bool fused_paths_on(const c10::Device& device);
// The time embedding's addend of each ResnetBlock2D of a U-Net forward, computed for all of them at once
// (time_addends) and set for the forward's duration; a resnet finds its own by its address (nullptr: it
// projects the embedding itself).
class ResnetBlock2DImpl;
const at::Tensor* time_addend(const ResnetBlock2DImpl* resnet);
int64_t batched_time_addend_calls();  // how many resnet forwards took a batched addend (for tests)
class TimeAddendsScope {
 public:
  TimeAddendsScope(const std::vector<ResnetBlock2DImpl*>& resnets, const at::Tensor& temb_act);
  ~TimeAddendsScope();
  TimeAddendsScope(const TimeAddendsScope&) = delete;
  TimeAddendsScope& operator=(const TimeAddendsScope&) = delete;

 private:
  std::vector<std::pair<const ResnetBlock2DImpl*, at::Tensor>> addends_, before_;
};

// GroupNorm of contiguous x [N, C, ...] or of NHWC x [N, C, H, W] (channels-last memory, kept: the output and
// x's gradient come in x's layout) (float32 or bfloat16), then SiLU with `silu`, as one autograd function
// over the project's kernels (src/nn/fused_norm.cpp): statistics and arithmetic in float32, loads and stores
// in x's type, the output in x's type, x and the statistics kept for the backward pass (not the
// pre-activation). On CUDA the kernels of src/nn/cuda/group_norm.cu (a build with them: fused_norm_built());
// on the CPU the same block program run serially, for tests. weight and bias ([C]) may be undefined. Autocast
// does not apply inside. With `addend` ([N, C], any floating type, differentiable): the normalization of x +
// addend[:, :, None, None] (ResnetBlock2D's time embedding, added inside the kernels instead of by a pass of
// its own).
at::Tensor fused_group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                            double eps, bool silu = false, const at::Tensor& addend = at::Tensor());
// Whether fused_group_norm takes x as it is on its device (type, layout, a build with the CUDA kernels).
bool fused_group_norm_applies(const at::Tensor& x);
int64_t fused_group_norm_calls();  // how many times fused_group_norm ran in this process (for tests)
// For tests: while one lives, set_fused_norm(true) also sends the CPU activations of this thread's U-Net
// forwards through fused_group_norm (its serial block program) and the attention's q, k, v projections
// through one convolution, as on CUDA, so that the network's use of the fused paths is checked where there is
// no GPU.
class FusedNormOnCpuForTests {
 public:
  FusedNormOnCpuForTests();
  ~FusedNormOnCpuForTests();
  FusedNormOnCpuForTests(const FusedNormOnCpuForTests&) = delete;
  FusedNormOnCpuForTests& operator=(const FusedNormOnCpuForTests&) = delete;

 private:
  bool before_;
};
bool fused_norm_on_cpu_for_tests();

// Whether the current thread runs a U-Net forward with channels-last activations, set for its duration by
// ChannelsLastScope (UNet2DModelImpl::forward with set_channels_last(true)).
bool channels_last_active();
class ChannelsLastScope {
 public:
  explicit ChannelsLastScope(bool on);
  ~ChannelsLastScope();
  ChannelsLastScope(const ChannelsLastScope&) = delete;
  ChannelsLastScope& operator=(const ChannelsLastScope&) = delete;

 private:
  bool before_;
};
// The rows of the time embedding each image of the batch reads, set for the duration of a U-Net forward by
// EmbeddingRowsScope when the forward computed the embedding once per distinct (timestep, label) instead of
// once per image: a resnet gathers its projection [distinct rows, C] to [N, C] by these indices. Undefined
// otherwise (an embedding of N rows in the batch's order, or of one row that broadcasts).
const at::Tensor& embedding_rows();
class EmbeddingRowsScope {
 public:
  explicit EmbeddingRowsScope(at::Tensor rows);
  ~EmbeddingRowsScope();
  EmbeddingRowsScope(const EmbeddingRowsScope&) = delete;
  EmbeddingRowsScope& operator=(const EmbeddingRowsScope&) = delete;

 private:
  at::Tensor before_;
};
// In a channels-last forward, t in NHWC memory (a no-op when it already is); t unchanged otherwise.
at::Tensor keep_layout(const at::Tensor& t);
// A 1x1 convolution, weight [K, C, 1, 1] or a Linear's [K, C], plus `residual` when defined (which it overwrites with
// the sum when residual_is_scratch allows, else it is only read). CPU float32 channel-major convolutions go through
// oneDNN's sgemm (conv1x1_cpu_into; conv1x1_cpu_train under autograd), the rest through at::conv2d.
at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& residual = {},
                   bool residual_is_scratch = false);

// Inverted dropout (zero with probability p, scale the rest by 1/(1-p)) whose mask on the CPU comes
// from a counter-based hash of (one 64-bit draw of the default generator, element index) computed in
// parallel: ~10x cheaper than LibTorch's bernoulli_, and the same mask whatever the thread count.
// On other devices: at::dropout.
at::Tensor dropout(const at::Tensor& x, double p);

// diffusers ResnetBlock2D, time_embedding_norm "default": norm1, SiLU, conv1, + time_emb_proj(temb),
// norm2, SiLU, dropout, conv2, + shortcut (1x1 conv_shortcut when in != out), / output_scale_factor.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups,
                    double eps, double dropout, double output_scale_factor);
  // temb_act: SiLU(time embedding) [N, temb_channels], computed once per forward by the model.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb_act);
  // For the model's batched time projections (TimeAddendsScope).
  const torch::nn::Linear& time_projection() const { return time_emb_proj; }
  const torch::nn::Conv2d& first_conv() const { return conv1; }

 private:
  torch::nn::GroupNorm norm1{nullptr};
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::Linear time_emb_proj{nullptr};
  torch::nn::GroupNorm norm2{nullptr};
  torch::nn::Conv2d conv2{nullptr};
  torch::nn::Conv2d conv_shortcut{nullptr};
  double output_scale_factor_ = 1.0;
  double dropout_p_ = 0.0;
};
TORCH_MODULE(ResnetBlock2D);

// diffusers Attention over the H*W tokens of a feature map (AttnProcessor semantics): group_norm,
// to_q/to_k/to_v, softmax(q k^T / sqrt(d)) v per head, to_out.0, + residual, / rescale_output_factor.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t channels, int64_t heads, int64_t head_dim, int64_t groups, double eps,
                double rescale_output_factor);
  at::Tensor forward(const at::Tensor& x);

 private:
  torch::nn::GroupNorm group_norm{nullptr};
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // [0] Linear, [1] Dropout (no parameters)
  torch::nn::Linear out_proj{nullptr};    // == to_out[0]
  int64_t heads_ = 1;
  int64_t head_dim_ = 1;
  double rescale_output_factor_ = 1.0;
};
TORCH_MODULE(Attention);

// diffusers Downsample2D (use_conv): padding 0 -> pad (0, 1, 0, 1) then 3x3 stride-2 conv; else conv pad 1.
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t padding);
  at::Tensor forward(const at::Tensor& x);

 private:
  torch::nn::Conv2d conv{nullptr};
  bool pad_right_bottom_ = false;
};
TORCH_MODULE(Downsample2D);

// diffusers Upsample2D (use_conv): nearest x2 then 3x3 conv.
class Upsample2DImpl : public torch::nn::Module {
 public:
  explicit Upsample2DImpl(int64_t channels);
  at::Tensor forward(const at::Tensor& x);

 private:
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// What one block of the U-Net is made of (derived from the config by the model).
struct BlockSpec {
  std::vector<int64_t> resnet_in;  // input channels of each resnet (after the skip concat for up blocks)
  int64_t out_channels = 0;
  int64_t temb_channels = 0;
  int64_t groups = 32;
  double eps = 1e-5;
  double dropout = 0.0;
  double output_scale_factor = 1.0;
  bool attention = false;  // one attention after each resnet (mid block: after all but the first)
  int64_t heads = 1;
  int64_t head_dim = 1;
  int64_t attn_groups = 32;
  bool downsample = false;  // down blocks: Downsample2D at the end (downsamplers.0)
  int64_t downsample_padding = 1;
  bool upsample = false;  // up blocks: Upsample2D at the end (upsamplers.0)
};

// The blocks a config makes, as UNet2DModel.__init__ derives them (channels, heads, groups). Not validated:
// validate_unet_config checks it.
struct UNetLayout {
  std::vector<BlockSpec> down;  // down_blocks.i
  BlockSpec mid;                // mid_block
  std::vector<BlockSpec> up;    // up_blocks.i
  int64_t temb_channels = 0;    // time_embed_dim
};
UNetLayout unet_layout(const UNetConfig& cfg);

// DownBlock2D / AttnDownBlock2D: resnets (+ attentions), then an optional downsampler. Appends every
// intermediate output to skips (the U-Net's skip connections).
class DownBlockImpl : public torch::nn::Module {
 public:
  explicit DownBlockImpl(const BlockSpec& spec);
  at::Tensor forward(at::Tensor x, const at::Tensor& temb_act, std::vector<at::Tensor>& skips);

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Attention> attentions_;
  Downsample2D downsampler_{nullptr};
};
TORCH_MODULE(DownBlock);

// UpBlock2D / AttnUpBlock2D: each resnet takes cat([x, skips.pop_back()]), then an optional upsampler.
class UpBlockImpl : public torch::nn::Module {
 public:
  explicit UpBlockImpl(const BlockSpec& spec);
  at::Tensor forward(at::Tensor x, const at::Tensor& temb_act, std::vector<at::Tensor>& skips);

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Attention> attentions_;
  Upsample2D upsampler_{nullptr};
};
TORCH_MODULE(UpBlock);

// UNetMidBlock2D (num_layers 1): resnet, attention (when add_attention), resnet.
class MidBlockImpl : public torch::nn::Module {
 public:
  explicit MidBlockImpl(const BlockSpec& spec);
  at::Tensor forward(at::Tensor x, const at::Tensor& temb_act);

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Attention> attentions_;
};
TORCH_MODULE(MidBlock);

// alpha * a @ b for a [B, M, K], b [B, K, N] (any strides), differentiable. float32 on the CPU goes through
// the sgemm of the oneDNN library LibTorch loads (when present); everything else through at::bmm/baddbmm.
at::Tensor batched_matmul(const at::Tensor& a, const at::Tensor& b, double alpha);
bool has_fast_cpu_gemm();
// y = w x + b (+ y when accumulate) for a 1x1 convolution without autograd: x [N, C, H, W] contiguous float32 on the
// CPU, w [K, C] and b [K] (or undefined) contiguous, y [N, K, H, W] contiguous. One single-threaded oneDNN sgemm per
// image, images in parallel: the result depends on neither the batch nor the thread count. False (nothing written)
// where that sgemm is missing.
bool conv1x1_cpu_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y, bool accumulate);
// The same convolution through autograd (training), x, w, b as above with oneDNN's sgemm present. Backward: the input's
// gradient one sgemm per image, the filters' in fixed blocks of output channels summed over the images in order (the
// same bits on any thread count).
at::Tensor conv1x1_cpu_train(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
// Row-major float32 products c = a b (a: m x k, b: k x n, leading dimensions lda, ldb, ldc) computed on the calling
// thread: oneDNN's sgemm with OpenMP held at one thread while the object lives (as inside at::parallel_for), else
// LibTorch's at::mm.
class SingleThreadedGemm {
 public:
  SingleThreadedGemm();
  ~SingleThreadedGemm();
  SingleThreadedGemm(const SingleThreadedGemm&) = delete;
  SingleThreadedGemm& operator=(const SingleThreadedGemm&) = delete;
  void operator()(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc) const;
  // c = alpha op(a) op(b) (op: 'N' or 'T') by oneDNN's sgemm alone; false where it is missing or refused.
  bool run_onednn(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float* c, int64_t ldc, float beta = 0.0f) const;
  // c += a^T b (a: k x m, leading dimension lda).
  void accumulate_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                     int64_t ldc) const;

 private:
  int threads_ = 0;
};
// Scaled dot-product attention on [B, L, d] without autograd on the CPU, in cache-sized chunks; [B, Lq, dv].
at::Tensor attention_inference_cpu(const at::Tensor& q3, const at::Tensor& k3, const at::Tensor& v3, double scale);
// out = alpha * a @ b into a contiguous [B, M, N] of the operands' type, without autograd.
void batched_matmul_into(const at::Tensor& a, const at::Tensor& b, double alpha, at::Tensor& out);

// diffusers get_timestep_embedding, built in float32 like diffusers: [N] -> [N, dim].
at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                              int64_t freq_shift);

}  // namespace nn_detail
}  // namespace diffuse
