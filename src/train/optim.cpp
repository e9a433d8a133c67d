#include "diffuse/train/optim.h"

#include <ATen/Parallel.h>

#include <cmath>

#include "diffuse/common.h"
#include "train/adamw_cpu.h"

namespace diffuse {

namespace {

bool cpu_float_contiguous(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

}  // namespace

FlatParameters::FlatParameters(const torch::OrderedDict<std::string, at::Tensor>& named_parameters, GradStorage storage,
                               bool channels_last)
    : storage_(storage) {
  int64_t total = 0;
  at::TensorOptions options;
  for (const auto& item : named_parameters) {
    names_.push_back(item.key());
    shapes_.push_back(item.value().sizes().vec());
    nhwc_.push_back(channels_last && item.value().dim() == 4);
    offsets_.push_back(total);
    total += item.value().numel();
    options = item.value().options();
  }
  data_ = at::empty({total}, options.requires_grad(false));
  if (storage_ == GradStorage::kPersistent) grad_ = at::zeros({total}, options.requires_grad(false));
  int64_t i = 0;
  for (const auto& item : named_parameters) {
    at::Tensor p = item.value();
    at::Tensor slice = view_of(data_, i);
    {
      at::NoGradGuard no_grad;
      slice.copy_(p);
    }
    p.set_data(slice);
    // Autograd accumulates in place into a defined .grad when grad mode is off in the backward pass,
    // so the gradient stays a view into grad_.
    p.mutable_grad() = grad_.defined() ? view_of(grad_, i) : at::Tensor();
    params_.push_back(p);
    ++i;
  }
}

void FlatParameters::gather_grad() {
  if (storage_ == GradStorage::kPersistent) return;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> parts;
  parts.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& g = params_[i].grad();
    // A gradient of any layout, read in the buffer's order for its parameter.
    parts.push_back(g.defined() ? flat_of(g, i) : at::zeros({params_[i].numel()}, data_.options()));
  }
  grad_ = at::cat(parts);
  parts.clear();
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].mutable_grad() = view_of(grad_, i);
  }
}

void FlatParameters::zero_grad() {
  if (storage_ == GradStorage::kPersistent) {
    grad_.zero_();
    return;
  }
  for (auto& p : params_) p.mutable_grad().reset();
  grad_.reset();
}

at::Tensor FlatParameters::clip_grad_norm(double max_norm) {
  if (!grad_.defined()) throw run_error("FlatParameters: clip_grad_norm before gather_grad");
  at::Tensor norm = grad_.norm();
  if (max_norm > 0) {
    // Scale by min(1, max_norm / (norm + 1e-6)) without a host sync.
    at::Tensor factor = (max_norm / (norm + 1e-6)).clamp_max(1.0);
    grad_.mul_(factor);
  }
  return norm;
}

at::Tensor FlatParameters::view_of(const at::Tensor& buffer, size_t i) const {
  const std::vector<int64_t>& s = shapes_[i];
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  const at::Tensor slice = buffer.narrow(0, offsets_[i], n);
  if (!nhwc_[i]) return slice.view(s);
  return slice.view({s[0], s[2], s[3], s[1]}).permute({0, 3, 1, 2});  // [O, I, kh, kw] in NHWC strides
}

at::Tensor FlatParameters::flat_of(const at::Tensor& t, size_t i) const {
  return nhwc_[i] ? t.permute({0, 2, 3, 1}).reshape({-1}) : t.reshape({-1});
}

TensorDict FlatParameters::views(const at::Tensor& buffer) const {
  TensorDict out;
  for (size_t i = 0; i < names_.size(); ++i) out.emplace_back(names_[i], view_of(buffer, i));
  return out;
}

void FlatParameters::load_into(at::Tensor& buffer, const TensorDict& tensors, const std::string& context) const {
  if (tensors.size() != names_.size()) {
    throw input_error(context + ": holds " + std::to_string(tensors.size()) + " tensors, the model has " +
                      std::to_string(names_.size()));
  }
  at::NoGradGuard no_grad;
  TensorDict dst = views(buffer);
  for (auto& [name, view] : dst) {
    const at::Tensor* src = find_tensor(tensors, name);
    if (!src) throw input_error(context + ": missing tensor " + name);
    if (src->sizes() != view.sizes()) throw input_error(context + ": tensor " + name + " has the wrong shape");
    view.copy_(*src);
  }
}

AdamW::AdamW(FlatParameters& params, const AdamWOptions& options) : params_(params), options_(options) {
  exp_avg_ = at::zeros_like(params_.data());
  exp_avg_sq_ = at::zeros_like(params_.data());
}

void AdamW::step(double lr) { apply(next_scalars(lr).to(params_.data().device())); }

at::Tensor AdamW::next_scalars(double lr) {
  ++step_;
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  return at::tensor({static_cast<float>(1.0 - lr * options_.weight_decay), static_cast<float>(std::sqrt(bc2)),
                     static_cast<float>(-lr / bc1)},
                    at::kFloat);
}

void AdamW::apply(const at::Tensor& scalars) {
  at::NoGradGuard no_grad;
  const double b1 = options_.beta1, b2 = options_.beta2;
  at::Tensor& p = params_.data();
  const at::Tensor& g = params_.grad();
  if (!g.defined()) throw run_error("AdamW: no gradient (FlatParameters::gather_grad comes after backward)");
  if (cpu_float_contiguous(p) && cpu_float_contiguous(g) && cpu_float_contiguous(exp_avg_) &&
      cpu_float_contiguous(exp_avg_sq_) && scalars.device().is_cpu() && g.numel() == p.numel()) {
    // On a CPU the tensor expressions below are ~10 passes over the parameters with three temporaries of their
    // size (page-faulted in at every step); one fused pass instead.
    const at::Tensor sc = scalars.to(at::kFloat).contiguous();
    const float* k = sc.data_ptr<float>();
    const AdamWNumbers s{k[0], static_cast<float>(1.0 - b1), static_cast<float>(b2), static_cast<float>(1.0 - b2),
                         k[1], k[2], static_cast<float>(options_.eps)};
    float* pp = p.data_ptr<float>();
    const float* pg = g.data_ptr<float>();
    float* pm = exp_avg_.data_ptr<float>();
    float* pv = exp_avg_sq_.data_ptr<float>();
    at::parallel_for(0, p.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      adamw_span(pp + begin, pg + begin, pm + begin, pv + begin, end - begin, s);
    });
    return;
  }
  // Decoupled weight decay (AdamW, Algorithm 2 line 12).
  if (options_.weight_decay != 0) p.mul_(scalars[0]);
  // Moment updates.
  exp_avg_.lerp_(g, 1.0 - b1);
  exp_avg_sq_.mul_(b2).addcmul_(g, g, 1.0 - b2);
  // Bias-corrected step: p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
  at::Tensor denom = (exp_avg_sq_.sqrt() / scalars[1]).add_(options_.eps);
  p.addcdiv_(exp_avg_ * scalars[2], denom);
}

Ema::Ema(const at::Tensor& params, double decay) : ema_(params.detach().clone()), decay_(decay) {}

double Ema::decay_at(int64_t step) const {
  return std::min(decay_, (1.0 + static_cast<double>(step)) / (10.0 + static_cast<double>(step)));
}

void Ema::update(const at::Tensor& params, int64_t step) {
  at::NoGradGuard no_grad;
  ema_.lerp_(params.detach(), 1.0 - decay_at(step));
}

void Ema::update(const at::Tensor& params, const at::Tensor& one_minus_decay) {
  at::NoGradGuard no_grad;
  ema_.lerp_(params.detach(), one_minus_decay);
}

}  // namespace diffuse
