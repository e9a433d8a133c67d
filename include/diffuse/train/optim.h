// AdamW over one flat parameter buffer: every parameter and its gradient is a view into a single
// contiguous tensor, so a step is a handful of whole-buffer kernels (no per-tensor launches) on CPU and
// GPU alike, and the global gradient norm is one reduction.
//
//   diffuse::FlatParameters flat(net->named_parameters());   // after net->to(device)
//   diffuse::AdamW opt(flat, {/*lr=*/2e-4});
//   loss.backward(); flat.gather_grad(); flat.clip_grad_norm(1.0); opt.step(lr); flat.zero_grad();
//
// The gradient buffer is persistent (GradStorage::kPersistent: the parameters' .grad are views into it, and
// backward accumulates into them in place; what the data-parallel reducer needs) or transient
// (kTransient: between steps no gradient exists, as after PyTorch's zero_grad(set_to_none=True); backward
// allocates each parameter's gradient as it reaches it, and gather_grad() copies them into a flat buffer
// once the activations are gone). Transient storage keeps the gradient out of the peak at the start of
// the backward pass, when every activation is still held.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/ordered_dict.h>

#include <cstdint>
#include <string>
#include <vector>

#include "diffuse/io/safetensors.h"

namespace diffuse {

enum class GradStorage { kPersistent, kTransient };

class FlatParameters {
 public:
  // Re-points each parameter (and, with persistent storage, its .grad) at a slice of one buffer. The
  // parameters keep their names. channels_last: every 4-d parameter (a convolution's weight) is stored in
  // [O, kh, kw, I] order and seen in NHWC strides, the layout the convolutions of channels-last activations want
  // (UNet2DModelImpl::set_channels_last), so that they need no copy of the weight and its gradient each step.
  explicit FlatParameters(const torch::OrderedDict<std::string, at::Tensor>& named_parameters,
                          GradStorage storage = GradStorage::kPersistent, bool channels_last = false);
  at::Tensor& data() { return data_; }   // [P] all parameters
  at::Tensor& grad() { return grad_; }   // [P] all gradients (transient: defined from gather_grad to zero_grad)
  int64_t numel() const { return data_.numel(); }
  GradStorage grad_storage() const { return storage_; }
  // After backward. Transient: copies the parameters' gradients into a new flat buffer (zeros for a
  // parameter that got none) and points their .grad at it. Persistent: nothing to do.
  void gather_grad();
  // Persistent: fills the buffer with zeros. Transient: frees the gradients.
  void zero_grad();
  // Global L2 norm of the gradient (a 0-dim tensor; no host sync). Scales the gradient down to
  // max_norm when above it (max_norm <= 0: no clipping).
  at::Tensor clip_grad_norm(double max_norm);
  // Named views into another buffer of the same layout (for EMA weights, optimizer moments), each in its
  // parameter's shape and strides.
  TensorDict views(const at::Tensor& buffer) const;
  TensorDict named_data() const { return views(data_); }
  // Copies named tensors (as saved) into a buffer of this layout; every name must be present.
  void load_into(at::Tensor& buffer, const TensorDict& tensors, const std::string& context) const;

 private:
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> shapes_;
  std::vector<int64_t> offsets_;
  std::vector<at::Tensor> params_;
  std::vector<bool> nhwc_;  // stored as [O, kh, kw, I]
  GradStorage storage_;
  at::Tensor view_of(const at::Tensor& buffer, size_t i) const;  // parameter i's slice of a flat buffer
  at::Tensor flat_of(const at::Tensor& t, size_t i) const;        // t (shaped as parameter i) in buffer order
  at::Tensor data_;
  at::Tensor grad_;
};

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// Loshchilov & Hutter (2019), decoupled weight decay; bias-corrected moments as in Kingma & Ba.
class AdamW {
 public:
  AdamW(FlatParameters& params, const AdamWOptions& options);
  void step(double lr);
  // The same step in two halves, so that the device half can be captured in a CUDA graph: next_scalars
  // counts the step and returns its numbers {1 - lr wd, sqrt(1 - beta2^t), -lr / (1 - beta1^t)} as a [3]
  // float32 CPU tensor; apply takes them as a tensor on the parameters' device (bit-identical to step()
  // on the CPU).
  at::Tensor next_scalars(double lr);
  void apply(const at::Tensor& scalars);
  int64_t step_count() const { return step_; }
  // State for checkpoints: exp_avg, exp_avg_sq (flat) and the step count.
  at::Tensor& exp_avg() { return exp_avg_; }
  at::Tensor& exp_avg_sq() { return exp_avg_sq_; }
  void set_step_count(int64_t s) { step_ = s; }

 private:
  FlatParameters& params_;
  AdamWOptions options_;
  at::Tensor exp_avg_;
  at::Tensor exp_avg_sq_;
  int64_t step_ = 0;
};

// Exponential moving average of the flat parameters: ema = decay * ema + (1 - decay) * params,
// with the warm-up decay min(decay, (1 + n) / (10 + n)).
class Ema {
 public:
  Ema(const at::Tensor& params, double decay);
  void update(const at::Tensor& params, int64_t step);
  // The update with 1 - decay given as a scalar tensor on the device (see AdamW::apply).
  void update(const at::Tensor& params, const at::Tensor& one_minus_decay);
  at::Tensor& data() { return ema_; }
  double decay_at(int64_t step) const;

 private:
  at::Tensor ema_;
  double decay_;
};

}  // namespace diffuse
