// UNet2DModel (diffusers models/unets/unet_2d.py): the DDPM U-Net of Ho et al. 2020 with diffusers'
// module names. conv_in -> down blocks (collecting skips) -> mid block -> up blocks (consuming skips)
// -> GroupNorm, SiLU, conv_out; a sinusoidal time embedding (+ class embedding) feeds every resnet.
#include "diffuse/nn/unet.h"

#include <torch/nn/modules/embedding.h>

#include <atomic>
#include <optional>
#include <set>

#include "diffuse/common.h"
#include "nn/blocks.h"

namespace diffuse {

namespace nn = torch::nn;
using nn_detail::BlockSpec;

namespace nn_detail {  // named, not anonymous: UNet2DModelImpl::Impl holds one
// The reduced-precision weights a FrozenWeightsScope keeps between forwards.
struct FrozenCast {
  int depth = 0;  // open scopes
  at::ScalarType dtype = at::kFloat;
  std::vector<at::Tensor> cast;
};
}  // namespace nn_detail
using nn_detail::FrozenCast;

struct UNet2DModelImpl::Impl {
  nn::Conv2d conv_in{nullptr};
  nn::Linear linear_1{nullptr}, linear_2{nullptr};  // time_embedding
  nn::Embedding class_embedding{nullptr};
  std::vector<nn_detail::DownBlock> down_blocks;
  nn_detail::MidBlock mid_block{nullptr};
  std::vector<nn_detail::UpBlock> up_blocks;
  nn::GroupNorm conv_norm_out{nullptr};
  nn::Conv2d conv_out{nullptr};
  int64_t size_multiple = 1;  // H and W must be multiples of this (2 ^ number of downsamplers)
  std::vector<nn_detail::ResnetBlock2DImpl*> resnets;  // all of them, for their batched time projections
  // The places of the convolutions' and linear layers' weights and biases in their modules (the tensors
  // autocast casts), in registration order, and which of them the fused paths read in the parameters' type
  // (the resnets' time projections and conv1 biases: nn_detail::TimeAddendsScope).
  std::vector<at::Tensor*> cast_slots;
  std::vector<bool> time_addend_parameter;
  FrozenCast frozen;
};

namespace {

std::atomic<bool> g_cast_in_one_buffer{true};
std::atomic<int64_t> g_casts_in_one_buffer{0};
std::atomic<int64_t> g_frozen_casts{0};

// Under mixed precision, for one forward of a network whose parameters lie in one buffer (FlatParameters):
// the convolutions' and linear layers' weights and biases cast at once
// (nn_detail::cast_parameters_in_one_buffer) and put in the modules' places, the float32 parameters back on
// exit. Autocast leaves tensors already in its dtype alone, so the network computes what autocast's
// per-parameter casts would give it, bit for bit; the registered parameters (parameters(), the optimizer's)
// stay the float32 ones. With the fused paths the resnets' time projections and conv1 biases stay float32:
// one GEMM outside autocast makes the fused normalization's float32 addends of them
// (nn_detail::TimeAddendsScope). Parameters not in one buffer: nothing changes, except in a
// FrozenWeightsScope. There, forwards without autograd cast once (the buffer, or each parameter) and keep the
// casts for the scope's later forwards. training_cast: the model's set_flat_cast, for forwards that record
// autograd.
class ReducedPrecisionWeights {
 public:
  ReducedPrecisionWeights(const std::vector<at::Tensor*>& slots,
                          const std::vector<bool>& time_addend_parameter, FrozenCast& frozen,
                          bool training_cast, const c10::Device& device, at::ScalarType dtype) {
    if (!g_cast_in_one_buffer || (at::GradMode::is_enabled() && !training_cast)) return;
    const bool keep_time_addend = nn_detail::fused_paths_on(device);
    std::vector<at::Tensor*> taken;
    std::vector<at::Tensor> params;
    for (size_t i = 0; i < slots.size(); ++i) {
      if (!slots[i]->defined() || (keep_time_addend && time_addend_parameter[i])) continue;
      taken.push_back(slots[i]);
      params.push_back(*slots[i]);
    }
    std::vector<at::Tensor> cast;
    const bool keep = frozen.depth > 0 && !at::GradMode::is_enabled();
    if (keep && frozen.dtype == dtype && frozen.cast.size() == params.size()) {
      cast = frozen.cast;
    } else {
      cast = nn_detail::cast_parameters_in_one_buffer(params, dtype);
      if (!cast.empty()) {
        ++g_casts_in_one_buffer;
      } else if (keep) {
        for (const at::Tensor& p : params) cast.push_back(p.to(dtype));
      }
      if (cast.empty()) return;
      if (keep) {
        frozen.cast = cast;
        frozen.dtype = dtype;
        ++g_frozen_casts;
      }
    }
    saved_.reserve(taken.size());
    for (size_t i = 0; i < taken.size(); ++i) {
      saved_.emplace_back(taken[i], std::move(*taken[i]));
      *taken[i] = cast[i];
    }
  }
  ~ReducedPrecisionWeights() {
    for (auto& [slot, param] : saved_) *slot = std::move(param);
  }
  ReducedPrecisionWeights(const ReducedPrecisionWeights&) = delete;
  ReducedPrecisionWeights& operator=(const ReducedPrecisionWeights&) = delete;

 private:
  std::vector<std::pair<at::Tensor*, at::Tensor>> saved_;
};

}  // namespace

UNet2DModelImpl::UNet2DModelImpl(const UNetConfig& cfg) : cfg_(cfg), impl_(std::make_shared<Impl>()) {
  validate_unet_config(cfg_);
  const nn_detail::UNetLayout layout = nn_detail::unet_layout(cfg_);
  const int64_t c0 = cfg_.block_out_channels[0];
  Impl& m = *impl_;
  // Registration order = diffusers' state_dict order (up_blocks before mid_block, as diffusers assigns).
  m.conv_in = register_module("conv_in", nn::Conv2d(nn::Conv2dOptions(cfg_.in_channels, c0, 3).padding(1)));
  auto time_embedding = std::make_shared<nn::Module>();
  m.linear_1 = time_embedding->register_module("linear_1", nn::Linear(c0, layout.temb_channels));
  m.linear_2 =
      time_embedding->register_module("linear_2", nn::Linear(layout.temb_channels, layout.temb_channels));
  register_module("time_embedding", time_embedding);
  if (cfg_.num_class_embeds) {
    m.class_embedding = register_module(
        "class_embedding", nn::Embedding(nn::EmbeddingOptions(*cfg_.num_class_embeds, layout.temb_channels)));
  }
  nn::ModuleList down_list, up_list;
  for (const BlockSpec& s : layout.down) {
    m.down_blocks.emplace_back(s);
    down_list->push_back(m.down_blocks.back());
    if (s.downsample) m.size_multiple *= 2;
  }
  for (const BlockSpec& s : layout.up) {
    m.up_blocks.emplace_back(s);
    up_list->push_back(m.up_blocks.back());
  }
  register_module("down_blocks", down_list);
  register_module("up_blocks", up_list);
  m.mid_block = register_module("mid_block", nn_detail::MidBlock(layout.mid));
  m.conv_norm_out = register_module(
      "conv_norm_out", nn::GroupNorm(nn::GroupNormOptions(cfg_.norm_num_groups, c0).eps(cfg_.norm_eps)));
  m.conv_out =
      register_module("conv_out", nn::Conv2d(nn::Conv2dOptions(c0, cfg_.out_channels, 3).padding(1)));
  std::set<const at::Tensor*> time_addend_slots;
  // named_modules lists a module before its children: a resnet's time-addend parameters are known by the time
  // its conv1 and time projection come.
  for (const auto& item : named_modules("", /*include_self=*/false)) {
    at::Tensor *w = nullptr, *b = nullptr;
    if (auto* r = item.value()->as<nn_detail::ResnetBlock2DImpl>()) {
      m.resnets.push_back(r);
      time_addend_slots.insert(
          {&r->first_conv()->bias, &r->time_projection()->weight, &r->time_projection()->bias});
      continue;
    } else if (auto* conv = item.value()->as<nn::Conv2dImpl>()) {
      w = &conv->weight;
      b = &conv->bias;
    } else if (auto* linear = item.value()->as<nn::LinearImpl>()) {
      w = &linear->weight;
      b = &linear->bias;
    } else {
      continue;
    }
    for (at::Tensor* p : {w, b}) {
      m.cast_slots.push_back(p);
      m.time_addend_parameter.push_back(time_addend_slots.count(p) > 0);
    }
  }
}

void set_flat_parameter_cast(bool on) { g_cast_in_one_buffer = on; }
bool flat_parameter_cast() { return g_cast_in_one_buffer; }
int64_t flat_parameter_casts() { return g_casts_in_one_buffer; }
int64_t frozen_weight_casts() { return g_frozen_casts; }

void UNet2DModelImpl::freeze_weights(bool on) {
  FrozenCast& f = impl_->frozen;
  f.depth += on ? 1 : -1;
  if (f.depth <= 0) {
    f.depth = 0;
    f.cast.clear();
  }
}

FrozenWeightsScope::FrozenWeightsScope(UNet2DModelImpl& net) : net_(net) { net_.freeze_weights(true); }
FrozenWeightsScope::~FrozenWeightsScope() { net_.freeze_weights(false); }

int64_t UNet2DModelImpl::num_parameters() const {
  int64_t total = 0;
  for (const at::Tensor& p : parameters()) total += p.numel();
  return total;
}

namespace {

std::string shape_str(const at::Tensor& t) { return nn_detail::shape_str(t.sizes()); }

// Timesteps [N] or a scalar/[1] (broadcast), any real dtype, on the model's device.
at::Tensor batch_timesteps(const at::Tensor& t, int64_t n, const at::Device& device) {
  if (!t.defined()) throw input_error("unet input: timesteps are missing");
  if (t.dim() > 1 || (t.numel() != 1 && t.numel() != n)) {
    throw input_error("unet input: timesteps must be a scalar or [N] with N = " + std::to_string(n) +
                      ", got " + shape_str(t));
  }
  if (t.scalar_type() == at::kBool || t.is_complex())
    throw input_error("unet input: timesteps must be real numbers");
  at::Tensor out = t.reshape({-1}).to(device);
  return out.numel() == n ? out : out.expand({n});
}

// Class labels [N] (or a scalar, broadcast), integers in [0, num_classes); checked where they are on the CPU.
at::Tensor batch_labels(const at::Tensor& y, int64_t n, int64_t num_classes, const at::Device& device) {
  if (!y.defined())
    throw input_error("unet input: class_labels are required (the model has num_class_embeds set)");
  if (y.dim() > 1 || (y.numel() != 1 && y.numel() != n)) {
    throw input_error("unet input: class_labels must be a scalar or [N] with N = " + std::to_string(n) +
                      ", got " + shape_str(y));
  }
  if (!at::isIntegralType(y.scalar_type(), /*includeBool=*/false)) {
    throw input_error("unet input: class_labels must be integers");
  }
  at::Tensor labels = y.reshape({-1}).to(at::kLong);
  if (labels.device().is_cpu()) {  // on an accelerator this check would cost a synchronization
    const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    if (lo < 0 || hi >= num_classes) {
      throw input_error("unet input: class_labels must lie in [0, " + std::to_string(num_classes) +
                        "), got " + std::to_string(lo < 0 ? lo : hi));
    }
  }
  labels = labels.to(device);
  return labels.numel() == n ? labels : labels.expand({n});
}

}  // namespace

at::Tensor UNet2DModelImpl::forward(const at::Tensor& x_in, const at::Tensor& timesteps,
                                    const at::Tensor& class_labels) {
  Impl& m = *impl_;
  const at::Tensor& w = m.conv_in->weight;
  if (!x_in.defined() || x_in.dim() != 4 || x_in.size(1) != cfg_.in_channels) {
    throw input_error("unet input: expected [N, " + std::to_string(cfg_.in_channels) + ", H, W], got " +
                      (x_in.defined() ? shape_str(x_in) : std::string("nothing")));
  }
  if (!x_in.is_floating_point()) throw input_error("unet input: x must be a floating-point tensor");
  const int64_t n = x_in.size(0), height = x_in.size(2), width = x_in.size(3);
  if (n == 0 || height == 0 || width == 0) throw input_error("unet input: empty tensor " + shape_str(x_in));
  if (height % m.size_multiple != 0 || width % m.size_multiple != 0) {
    throw input_error("unet input: height and width must be multiples of " + std::to_string(m.size_multiple) +
                      " (the U-Net halves them " + std::to_string(cfg_.block_out_channels.size() - 1) +
                      " times), got " + std::to_string(height) + "x" + std::to_string(width));
  }
  nn_detail::ChannelsLastScope layout(channels_last_);
  const c10::Device device = w.device();
  const at::ScalarType dtype =
      w.scalar_type();  // the parameters' (w is reassigned under ReducedPrecisionWeights)
  at::Tensor out;
  if (precision_ != Precision::kFloat32) {
    AutocastGuard autocast(device, precision_);
    const ReducedPrecisionWeights weights(m.cast_slots, m.time_addend_parameter, m.frozen, flat_cast_, device,
                                          autocast_target(device));
    out = forward_impl(x_in, timesteps, class_labels, dtype).to(dtype);
  } else {
    out = forward_impl(x_in, timesteps, class_labels, dtype);
  }
  return channels_last_ ? out.contiguous() : out;
}

at::Tensor UNet2DModelImpl::forward_impl(const at::Tensor& x_in, const at::Tensor& timesteps,
                                         const at::Tensor& class_labels, at::ScalarType dtype) {
  Impl& m = *impl_;
  const at::Tensor& w = m.conv_in->weight;
  const int64_t n = x_in.size(0);
  at::Tensor x = x_in.to(w.device(), dtype);
  if (channels_last_) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (cfg_.center_input_sample) x = 2 * x - 1.0;

  // Time embedding: float32 sinusoid (as diffusers), cast to the model dtype, linear_1, SiLU, linear_2.
  at::Tensor t = batch_timesteps(timesteps, n, w.device());
  // A sampler's step evaluates a whole batch at one timestep: on a CPU without autograd, the model then
  // computes the embedding, and every resnet its projection of it, once per distinct label (an unconditional
  // model: once), which the resnets broadcast or gather over the batch (2.5% of an unconditional sampling run
  // went to these small products, more with guidance's doubled batch). Not on a GPU, where reading t would
  // synchronize.
  const bool one_timestep =
      n > 1 && t.device().is_cpu() && !at::GradMode::is_enabled() && at::equal(t, t.select(0, 0).expand({n}));
  if (one_timestep) t = t.slice(0, 0, 1);
  at::Tensor emb =
      nn_detail::timestep_embedding(t, cfg_.block_out_channels[0], cfg_.flip_sin_to_cos, cfg_.freq_shift)
          .to(dtype);
  emb = m.linear_2->forward(nn_detail::silu_temp(m.linear_1->forward(emb)));
  at::Tensor rows;  // with one timestep and several labels: the embedding row of each image
  if (m.class_embedding) {
    at::Tensor labels = batch_labels(class_labels, n, *cfg_.num_class_embeds, w.device());
    if (one_timestep) {
      // Distinct labels in sorted order: rows [distinct] and each image's index into them. When every label
      // is distinct the batch keeps its own order (no gain, and no gather).
      auto [distinct, inverse, counts] =
          at::_unique2(labels, /*sorted=*/true, /*return_inverse=*/true, false);
      if (distinct.size(0) < n) {
        labels = distinct;
        if (distinct.size(0) > 1) rows = inverse.reshape({n});
      }
    }
    emb = emb + m.class_embedding->forward(labels);
  } else if (class_labels.defined()) {
    throw input_error(
        "unet input: class_labels given but the model is unconditional (num_class_embeds is null)");
  }
  // Every resnet applies SiLU to the embedding first: do it once.
  const at::Tensor temb_act = nn_detail::silu_temp(emb);
  const nn_detail::EmbeddingRowsScope embedding_rows(rows);
  std::optional<nn_detail::TimeAddendsScope> time_addends;
  if (nn_detail::fused_paths_on(w.device())) time_addends.emplace(m.resnets, temb_act);

  at::Tensor h = nn_detail::conv3x3(m.conv_in, x);
  std::vector<at::Tensor> skips;
  skips.reserve(1 + cfg_.block_out_channels.size() * (cfg_.layers_per_block + 1));
  skips.push_back(h);
  for (nn_detail::DownBlock& block : m.down_blocks) h = block->forward(h, temb_act, skips);
  h = m.mid_block->forward(h, temb_act);
  for (nn_detail::UpBlock& block : m.up_blocks) h = block->forward(h, temb_act, skips);
  h = nn_detail::group_norm_silu(m.conv_norm_out, h);
  return nn_detail::conv3x3(m.conv_out, h);
}

}  // namespace diffuse
