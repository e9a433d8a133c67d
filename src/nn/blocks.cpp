// The U-Net's blocks, same math and module names as diffusers (models/resnet.py, attention_processor.py,
// downsampling.py, upsampling.py, unets/unet_2d_blocks.py).
#include "nn/blocks.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/version.h>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <sstream>

#include "diffuse/common.h"
#include "diffuse/nn/precision.h"
#include "diffuse/nn/unet.h"
#include "nn/group_norm_cpu.h"

namespace diffuse {
namespace nn_detail {

namespace nn = torch::nn;

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

at::Tensor silu_temp(at::Tensor x) {
  // In place only when autograd records nothing (silu's backward needs its input).
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return at::silu_(x);
  return at::silu(x);
}

namespace {

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

at::Tensor dropout(const at::Tensor& x, double p) {
  if (p <= 0.0) return x;
  if (p >= 1.0) return x * 0;
  if (!x.device().is_cpu()) return at::dropout(x, p, /*train=*/true);
  uint64_t seed;
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed = gen.get<at::CPUGeneratorImpl>()->random64();
  }
  // Element i is kept when the i-th 32-bit word of the hash stream is at or above p * 2^32.
  const uint32_t threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
  at::Tensor mask = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = mask.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mask.scalar_type(), "diffuse_dropout", [&] {
    scalar_t* m = mask.data_ptr<scalar_t>();
    const scalar_t keep = static_cast<scalar_t>(1.0 / (1.0 - p)), drop = static_cast<scalar_t>(0.0);
    at::parallel_for(0, (n + 1) / 2, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const uint64_t h = splitmix64(seed ^ (static_cast<uint64_t>(j) * 0xD1B54A32D192ED03ULL));
        const int64_t i = 2 * j;
        m[i] = static_cast<uint32_t>(h) >= threshold ? keep : drop;
        if (i + 1 < n) m[i + 1] = static_cast<uint32_t>(h >> 32) >= threshold ? keep : drop;
      }
    });
  });
  return x * mask;
}

// Attention without autograd on the CPU, a few [Lq, Lk] score blocks at a time. Made whole, the scores are
// large (64 images x 4 heads at 14x14 is 40 MB in float32) and each of the three passes over them (GEMM,
// softmax, GEMM) goes to memory; in chunks that stay in cache the softmax alone ran 3.5x faster. In
// bfloat16 the softmax runs on the bfloat16 scores directly: LibTorch's kernel accumulates in float32
// and rounds once at the end, which is what the float32 round trip of the training path gives, minus two
// casts over the whole tensor. Returns [B, Lq, dv] (a channel-major view in float32).
at::Tensor attention_inference_cpu(const at::Tensor& q3, const at::Tensor& k3, const at::Tensor& v3, double scale) {
  const int64_t b = q3.size(0), lq = q3.size(1), lk = k3.size(1), dv = v3.size(2);
  constexpr int64_t kChunkBytes = 1 << 20;  // score bytes per chunk (float32 accounting)
  const int64_t per = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, lq * lk * 4));
  const bool reduced = q3.scalar_type() == at::kHalf || q3.scalar_type() == at::kBFloat16;
  // float32: (P V)^T = V^T P^T into channel-major [B, dv, Lq], as the training path; reduced: P V.
  at::Tensor out = reduced ? at::empty({b, lq, dv}, q3.options()) : at::empty({b, dv, lq}, q3.options());
  // The chunks in parallel, each on one thread with its own scores (the products and the softmax inside run serially
  // there): one parallel region per call instead of three per chunk, whose start-up cost had kept the second core
  // mostly idle. Each chunk is computed as on one thread, so the result does not depend on the thread count.
  const int64_t chunks = (b + per - 1) / per;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::NoGradGuard no_grad;  // grad mode is per thread
    at::Tensor scores = at::empty({std::min(per, b), lq, lk}, q3.options());
    for (int64_t i = chunk_begin * per; i < std::min(b, chunk_end * per); i += per) {
      const int64_t c = std::min(per, b - i);
      at::Tensor s = scores.narrow(0, 0, c);
      batched_matmul_into(q3.narrow(0, i, c), k3.narrow(0, i, c).transpose(1, 2), scale, s);
      at::Tensor o = out.narrow(0, i, c);
      if (reduced) {
        // LibTorch 1.x has no float16 softmax on the CPU: that one goes through float32.
        at::Tensor p = q3.scalar_type() == at::kBFloat16
                           ? at::_softmax(s, -1, false)
                           : at::_softmax(s.to(at::kFloat), -1, false).to(s.scalar_type());
        at::bmm_out(o, p, v3.narrow(0, i, c));
      } else {
        batched_matmul_into(v3.narrow(0, i, c).transpose(1, 2), at::_softmax(s, -1, false).transpose(1, 2), 1.0, o);
      }
    }
  });
  return reduced ? out : out.transpose(1, 2);
}

namespace {
std::atomic<bool> g_reduced_norm{false};
thread_local bool t_channels_last = false;
thread_local at::Tensor t_embedding_rows;
thread_local std::vector<std::pair<const ResnetBlock2DImpl*, at::Tensor>> t_time_addends;
std::atomic<int64_t> g_nhwc_norm_calls{0};
std::atomic<int64_t> g_fused_qkv_calls{0};
std::atomic<int64_t> g_batched_time_addend_calls{0};

c10::DispatchKeySet autocast_keys() {
  return c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA});
}
}  // namespace

bool channels_last_active() { return t_channels_last; }
ChannelsLastScope::ChannelsLastScope(bool on) : before_(t_channels_last) { t_channels_last = on; }
ChannelsLastScope::~ChannelsLastScope() { t_channels_last = before_; }

const at::Tensor& embedding_rows() { return t_embedding_rows; }
EmbeddingRowsScope::EmbeddingRowsScope(at::Tensor rows) : before_(std::move(t_embedding_rows)) {
  t_embedding_rows = std::move(rows);
}
EmbeddingRowsScope::~EmbeddingRowsScope() { t_embedding_rows = std::move(before_); }

const at::Tensor* time_addend(const ResnetBlock2DImpl* resnet) {
  for (const auto& [r, e] : t_time_addends) {
    if (r == resnet) return &e;
  }
  return nullptr;
}

// a + b, b's gradient a copy of a's: AccumulateGrad keeps the views the concatenations' backward hands each
// parameter as that parameter's gradient, which must not share memory with another parameter's (an in-place
// accumulation into one would change the other).
struct AddOwnGradients : public torch::autograd::Function<AddOwnGradients> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& a, const at::Tensor& b) {
    return a + b;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list g) {
    return {g[0], g[0].clone()};
  }
};

// One GEMM for every resnet's projection of SiLU(embedding): their weights stacked [sum C, temb], their
// biases plus conv1's as its bias, the result split into views [N, C] (split's backward is one
// concatenation). In the parameters' type, outside autocast: float32 addends for the fused normalization,
// which reads them in float32. Instead of a GEMM per resnet forward and three backward, an addition of
// conv1's bias forward and its reduction backward, and the embedding's gradient summed over the resnets.
TimeAddendsScope::TimeAddendsScope(const std::vector<ResnetBlock2DImpl*>& resnets, const at::Tensor& temb_act)
    : before_(std::move(t_time_addends)) {
  std::vector<at::Tensor> weights, biases, conv1_biases;
  std::vector<int64_t> sizes;
  auto or_zeros = [](const at::Tensor& b, const at::Tensor& w) {
    return b.defined() ? b : at::zeros({w.size(0)}, w.options());
  };
  for (const ResnetBlock2DImpl* r : resnets) {
    const at::Tensor& w = r->time_projection()->weight;
    weights.push_back(w);
    sizes.push_back(w.size(0));
    biases.push_back(or_zeros(r->time_projection()->bias, w));
    conv1_biases.push_back(or_zeros(r->first_conv()->bias, w));
  }
  std::vector<at::Tensor> parts;
  {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
    const at::Tensor w = at::cat(weights);
    // The two bias vectors concatenated, then added: one addition forward, one copy backward.
    parts = at::addmm(AddOwnGradients::apply(at::cat(biases), at::cat(conv1_biases)),
                      temb_act.to(w.scalar_type()), w.t())
                .split_with_sizes(sizes, 1);
  }
  for (size_t i = 0; i < resnets.size(); ++i) addends_.emplace_back(resnets[i], std::move(parts[i]));
  t_time_addends = addends_;
}
TimeAddendsScope::~TimeAddendsScope() { t_time_addends = std::move(before_); }

int64_t group_norm_nhwc_calls() { return g_nhwc_norm_calls; }
int64_t batched_time_addend_calls() { return g_batched_time_addend_calls; }
int64_t fused_qkv_calls() { return g_fused_qkv_calls; }

at::Tensor keep_layout(const at::Tensor& t) {
  return t_channels_last && t.dim() == 4 ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

bool autograd_records(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  auto wants = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
  return at::GradMode::is_enabled() && (wants(x) || wants(w) || wants(b));
}

namespace {
// Whether a 1x1 convolution takes oneDNN's sgemm (conv1x1_cpu_into, conv1x1_cpu_train): CPU float32 channel-major,
// no autocast. oneDNN's own 1x1 kernels were slow on some of the U-Net's shapes (192 -> 64 channels at 28x28, batch
// 64: ~36 ms, 34 GFLOP/s); through sgemm the fmnist U-Net sampled ~5% and trained ~5% faster.
bool conv1x1_by_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return !t_channels_last && x.dim() == 4 && x.is_cpu() && x.scalar_type() == at::kFloat &&
         w.scalar_type() == at::kFloat && (!b.defined() || b.scalar_type() == at::kFloat) && x.is_contiguous() &&
         x.layout() == at::kStrided && !autocast_active(c10::Device(c10::kCPU)) && has_fast_cpu_gemm();
}
}  // namespace

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& residual,
                   bool residual_is_scratch) {
  const int64_t k = w.size(0), c = w.numel() / std::max<int64_t>(1, k);
  if (conv1x1_by_gemm(x, w, b) && x.size(1) == c) {
    const at::Tensor w2 = w.reshape({k, c}).contiguous();
    const at::Tensor b2 = b.defined() ? b.contiguous() : b;
    if (autograd_records(x, w, b)) {
      at::Tensor y = conv1x1_cpu_train(x, w2, b2);
      return residual.defined() ? y.add_(residual) : y;
    }
    if (residual_is_scratch && residual.defined() && residual.is_contiguous() &&
        residual.scalar_type() == at::kFloat && !residual.requires_grad() &&
        residual.sizes() == at::IntArrayRef({x.size(0), k, x.size(2), x.size(3)})) {
      at::Tensor y = residual;
      if (conv1x1_cpu_into(x, w2, b2, y, true)) return y;
    } else {
      at::Tensor y = at::empty({x.size(0), k, x.size(2), x.size(3)}, x.options());
      if (conv1x1_cpu_into(x, w2, b2, y, false)) return residual.defined() ? y.add_(residual) : y;
    }
  }
  at::Tensor y = keep_layout(at::conv2d(x, w.view({k, c, 1, 1}), b));
  return residual.defined() ? y.add_(residual) : y;
}

namespace {

// [N, C, H, W] -> [N, H*W, G, C/G]: for NHWC memory a view, in which each group's elements span dims 1 and 3.
at::Tensor nhwc_groups(const at::Tensor& t, int64_t groups) {
  return t.permute({0, 2, 3, 1}).reshape({t.size(0), t.size(2) * t.size(3), groups, t.size(1) / groups});
}

// y = (x - mean) * rstd * weight + bias per (image, channel), with the statistics (float64 sums) and the
// per-channel factors in float32 and the elementwise passes in x's type (apply_affine); then, with `silu`, y = silu(y) in place. The
// backward pass is LibTorch's GroupNorm formula in float32 from what forward kept (x, mean, rstd), cast once to x's
// type: autograd through the composition would sum its bf16 terms, which cancel. With silu it first recomputes the
// pre-activation from x instead of keeping it (one activation less held per normalization until the backward pass).
struct GroupNormNhwcFn : public torch::autograd::Function<GroupNormNhwcFn> {
  // weight, bias: float32 [C].
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t groups, double eps, bool silu) {
    // Statistics from per-channel sums over the pixels (reductions along the contiguous channel dimension, several
    // times faster than reducing each group's strided elements), accumulated in float64 so that E[x^2] - E[x]^2
    // keeps its digits even where the mean is 1000 times the spread.
    const int64_t n = x.size(0), c = x.size(1), cg = c / groups;
    const at::Tensor x3 = x.permute({0, 2, 3, 1}).reshape({n, x.size(2) * x.size(3), c});  // a view of NHWC memory
    const std::vector<int64_t> pixels{1};
    const at::Tensor s1 = at::sum(x3, pixels, /*keepdim=*/false, at::kDouble).view({n, groups, cg}).sum(2);
    const at::Tensor s2 = at::linalg_vector_norm(x3, 2, pixels, /*keepdim=*/false, at::kDouble)
                              .square()
                              .view({n, groups, cg})
                              .sum(2);
    const double d = static_cast<double>(x3.size(1) * cg);  // elements per group
    const at::Tensor mean64 = s1 / d;
    const at::Tensor mean = mean64.to(at::kFloat);                                        // [N, G]
    const at::Tensor var = (s2 / d - mean64.square()).clamp_min(0).to(at::kFloat);  // [N, G]
    const at::Tensor rstd = (var + eps).rsqrt();
    ctx->save_for_backward({x, weight, bias, mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    at::Tensor y = apply_affine(x, mean, rstd, weight, bias, groups);
    return silu ? at::silu_(y) : y;
  }

  // The normalization's elementwise part from [N, G] float32 statistics. float32 x: one pass, x * scale + shift with
  // scale = rstd w and shift = b - mean scale. Reduced x: scale and shift rounded to x's type would cancel to an
  // error of |mean| scale 2^-9 (bf16) where |mean| >> std, so x is first centred on the mean rounded to x's type
  // (exact where they are close) and the rounding's remainder goes into a shift of the output's size:
  // (x - m) * scale + (b + (m - mean) scale), two passes in x's type. The broadcast operands have no H, W strides:
  // the output takes x's layout.
  static at::Tensor apply_affine(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                                 const at::Tensor& weight, const at::Tensor& bias, int64_t groups) {
    const int64_t n = x.size(0), c = x.size(1), cg = c / groups;
    const at::ScalarType dtype = x.scalar_type();
    const at::Tensor scale = rstd.unsqueeze(2) * weight.view({1, groups, cg});  // [N, G, C/G]
    auto per_channel = [&](const at::Tensor& t) { return t.expand({n, groups, cg}).reshape({n, c, 1, 1}); };
    if (dtype == at::kFloat) {
      return at::addcmul(per_channel(bias.view({1, groups, cg}) - mean.unsqueeze(2) * scale), x, per_channel(scale));
    }
    const at::Tensor m = mean.to(dtype);
    const at::Tensor shift = bias.view({1, groups, cg}) + (m.to(at::kFloat) - mean).unsqueeze(2) * scale;
    return at::addcmul(per_channel(shift).to(dtype), x - per_channel(m.unsqueeze(2)), per_channel(scale).to(dtype));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int64_t n = x.size(0), c = x.size(1), cg = c / groups;
    const at::Tensor w = weight.view({1, groups, cg});
    at::Tensor g = grads[0];
    if (ctx->saved_data["silu"].toBool()) {
      // The gradient through SiLU at the pre-activation, recomputed as forward made it.
      g = at::silu_backward(g, apply_affine(x, mean, rstd, weight, bias, groups));
    }
    const at::Tensor xv = nhwc_groups(x, groups).to(at::kFloat), gv = nhwc_groups(g, groups).to(at::kFloat);
    const double d = static_cast<double>(xv.size(1) * cg);  // elements per group
    const at::Tensor ds = (gv * xv).sum(1), db = gv.sum(1);  // [N, G, C/G]: sums over the pixels of g x and g
    at::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) {
      // dx = a g + b x + e with a = rstd w, b = (mean sum(w g) - sum(w g x)) rstd^3 / d and
      // e = -b mean - rstd sum(w g) / d.
      const at::Tensor dsw = (ds * w).sum(2), dbw = (db * w).sum(2);  // [N, G]
      const at::Tensor b = (dbw * mean - dsw) * rstd.pow(3) / d;
      const at::Tensor e = -b * mean - dbw * rstd / d;
      // One full-size buffer: the first product, then in place (gv may be the incoming gradient itself).
      at::Tensor gxv = gv * (rstd.unsqueeze(2) * w).unsqueeze(1);
      gxv.add_(e.view({n, 1, groups, 1})).addcmul_(xv, b.view({n, 1, groups, 1}));
      gx = gxv.view({n, x.size(2), x.size(3), c}).permute({0, 3, 1, 2}).to(x.scalar_type());
    }
    if (ctx->needs_input_grad(1)) gw = ((ds - db * mean.unsqueeze(2)) * rstd.unsqueeze(2)).sum(0).reshape({c});
    if (ctx->needs_input_grad(2)) gb = db.sum(0).reshape({c});
    return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor group_norm_nhwc(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, at::ScalarType dtype, bool silu) {
  if (x.dim() != 4 || groups <= 0 || x.size(1) % groups != 0 || x.numel() == 0) {
    throw input_error("group_norm_nhwc: expected a non-empty [N, C, H, W] with C divisible by " +
                      std::to_string(groups) + " groups, got " + shape_str(x.sizes()));
  }
  const int64_t c = x.size(1);
  for (const at::Tensor* p : {&weight, &bias}) {
    if (p->defined() && (p->dim() != 1 || p->size(0) != c)) {
      throw input_error("group_norm_nhwc: weight and bias must be [" + std::to_string(c) + "], got " +
                        shape_str(p->sizes()));
    }
  }
  ++g_nhwc_norm_calls;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  return GroupNormNhwcFn::apply(x.scalar_type() == dtype ? x : x.to(dtype),
                                weight.defined() ? weight.to(at::kFloat) : at::ones({c}, f32),
                                bias.defined() ? bias.to(at::kFloat) : at::zeros({c}, f32), groups, eps, silu);
}

namespace {
// CPU float32 channel-major GroupNorm (+ SiLU) by the project's kernels (nn/group_norm_cpu.h), one (image, group) block
// at a time: its moments and output computed while the block is in cache, instead of LibTorch's GroupNorm (statistics,
// then the affine pass) and a SiLU pass. In training an autograd function keeps x and the blocks' statistics (LibTorch
// kept x and, for SiLU, the normalization's output too) and computes the gradients block by block in two passes.
bool group_norm_cpu_applies(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  auto per_channel = [&x](const at::Tensor& t) {
    return !t.defined() || (t.scalar_type() == at::kFloat && t.numel() == x.size(1));
  };
  return !t_channels_last && x.dim() >= 2 && x.numel() > 0 && x.is_cpu() && x.layout() == at::kStrided &&
         x.scalar_type() == at::kFloat && x.is_contiguous() && per_channel(w) && per_channel(b) &&
         !autocast_active(c10::Device(c10::kCPU));
}

struct CpuGroups {
  int64_t n, c, hw, groups, cg;
};

CpuGroups cpu_groups(const at::Tensor& x, int64_t groups) {
  const int64_t n = x.size(0), c = x.size(1);
  if (groups <= 0 || c % groups != 0) {
    throw input_error("GroupNorm: " + std::to_string(c) + " channels do not split into " + std::to_string(groups) +
                      " groups");
  }
  return {n, c, x.numel() / (n * c), groups, c / groups};
}

// y from contiguous float32 x, w, b; with `stats` ([N * groups, 2] float32) the blocks' mean and rstd.
at::Tensor group_norm_cpu_forward(const at::Tensor& x, const CpuGroups& g, const at::Tensor& w, const at::Tensor& b,
                                  double eps, bool silu, float* stats) {
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, g.n * g.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = (blk % g.groups) * g.cg, offset = blk * g.cg * g.hw;
      group_norm_block(px + offset, py + offset, g.cg, g.hw, pw + c0, pb + c0, e, silu,
                       stats ? stats + 2 * blk : nullptr);
    }
  });
  return y;
}

// Autograd over group_norm_cpu_forward; weight and bias defined (LibTorch 1.x's custom functions take no undefined
// inputs). The parameters' gradients add the images' per-channel sums in order: the same bits on any thread count.
struct GroupNormCpuFn : public torch::autograd::Function<GroupNormCpuFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& b, int64_t groups, double eps, bool silu) {
    const CpuGroups g = cpu_groups(x, groups);
    at::Tensor stats = at::empty({g.n * g.groups, 2}, x.options());
    at::Tensor y = group_norm_cpu_forward(x, g, w, b, eps, silu, stats.data_ptr<float>());
    ctx->save_for_backward({x, w, b, stats});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &stats = saved[3];
    const CpuGroups g = cpu_groups(x, ctx->saved_data["groups"].toInt());
    const bool silu = ctx->saved_data["silu"].toBool();
    const at::Tensor gy = grads[0].contiguous();
    at::Tensor gx = at::empty_like(x);
    at::Tensor sums = at::empty({2, g.n, g.c}, x.options());  // per image and channel: dw's, then db's terms
    const float *px = x.data_ptr<float>(), *pg = gy.data_ptr<float>(), *pw = w.data_ptr<float>(),
                *pb = b.data_ptr<float>(), *ps = stats.data_ptr<float>();
    float *pgx = gx.data_ptr<float>(), *pdw = sums.data_ptr<float>(), *pdb = pdw + g.n * g.c;
    at::parallel_for(0, g.n * g.groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(static_cast<size_t>(g.cg * g.hw));
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = (blk % g.groups) * g.cg, offset = blk * g.cg * g.hw;
        const int64_t at_nc = (blk / g.groups) * g.c + c0;
        group_norm_block_backward(px + offset, pg + offset, pgx + offset, g.cg, g.hw, pw + c0, pb + c0, ps + 2 * blk,
                                  silu, scratch.data(), pdw + at_nc, pdb + at_nc);
      }
    });
    at::Tensor gw, gb;
    if (ctx->needs_input_grad(1)) gw = sum_images_in_order(sums[0]);
    if (ctx->needs_input_grad(2)) gb = sum_images_in_order(sums[1]);
    return {ctx->needs_input_grad(0) ? gx : at::Tensor(), gw, gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }

  // [N, C] float32 contiguous -> [C], adding image 0, 1, ... in turn.
  static at::Tensor sum_images_in_order(const at::Tensor& t) {
    at::Tensor out = t[0].clone();
    float* po = out.data_ptr<float>();
    const float* pt = t.data_ptr<float>();
    const int64_t n = t.size(0), c = t.size(1);
    for (int64_t i = 1; i < n; ++i) {
      for (int64_t k = 0; k < c; ++k) po[k] += pt[i * c + k];
    }
    return out;
  }
};

at::Tensor group_norm_cpu(const at::Tensor& x, int64_t groups, const at::Tensor& w, const at::Tensor& b, double eps,
                          bool silu) {
  const int64_t c = x.size(1);
  const at::Tensor wc = w.defined() ? w.contiguous() : at::ones({c}, x.options());
  const at::Tensor bc = b.defined() ? b.contiguous() : at::zeros({c}, x.options());
  if (autograd_records(x, w, b)) return GroupNormCpuFn::apply(x, wc, bc, groups, eps, silu);
  return group_norm_cpu_forward(x, cpu_groups(x, groups), wc, bc, eps, silu, nullptr);
}

// Whether this normalization goes through fused_group_norm (set_fused_norm; CUDA, or the CPU in tests).
bool fused_norm_here(const at::Tensor& x) {
  return (x.is_cuda() || fused_norm_on_cpu_for_tests()) && fused_norm() && fused_group_norm_applies(x);
}

// Whether the attention's q, k, v projections of h run as one convolution: with the fused paths
// (set_fused_norm) on CUDA, or on the CPU in tests, where all three have a bias of the weights' type.
bool fused_qkv_here(const at::Tensor& h, const nn::Linear& q, const nn::Linear& k, const nn::Linear& v) {
  if (!fused_paths_on(h.device())) return false;
  for (const nn::Linear* p : {&q, &k, &v}) {
    if (!(*p)->bias.defined() || (*p)->bias.scalar_type() != q->weight.scalar_type() ||
        (*p)->weight.scalar_type() != q->weight.scalar_type()) {
      return false;
    }
  }
  return true;
}

at::Tensor norm_impl(nn::GroupNorm& norm, const at::Tensor& x, bool silu) {
  const at::Tensor& w = norm->weight;
  const at::Tensor& b = norm->bias;
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  // Autocast would run GroupNorm in float32 (on CUDA it is on autocast's float32 list): with --reduced-norm
  // it is kept out of it.
  const bool on_reduced = g_reduced_norm && reduced && w.defined() && w.scalar_type() != x.scalar_type() &&
                          autocast_active(x.device());
  // The fused kernels take NCHW and NHWC memory alike.
  if (fused_norm_here(x))
    return fused_group_norm(x, norm->options.num_groups(), w, b, norm->options.eps(), silu);
  if (t_channels_last && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    // The same arithmetic types as below: x's own under --reduced-norm, else the parameters'.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
    return group_norm_nhwc(x, norm->options.num_groups(), w, b, norm->options.eps(),
                           on_reduced || !w.defined() ? x.scalar_type() : w.scalar_type(), silu);
  }
  if (group_norm_cpu_applies(x, w, b)) {
    return group_norm_cpu(x, norm->options.num_groups(), w, b, norm->options.eps(), silu);
  }
  at::Tensor y;
  if (on_reduced) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
    y = at::group_norm(x, norm->options.num_groups(), w.to(x.scalar_type()), b.defined() ? b.to(x.scalar_type()) : b,
                       norm->options.eps(), at::globalContext().userEnabledCuDNN());
  } else {
    y = !w.defined() || x.scalar_type() == w.scalar_type() ? norm->forward(x) : norm->forward(x.to(w.scalar_type()));
  }
  return silu ? silu_temp(y) : y;
}
}  // namespace

bool fused_paths_on(const c10::Device& device) {
  return (device.is_cuda() || fused_norm_on_cpu_for_tests()) && fused_norm();
}

at::Tensor group_norm(nn::GroupNorm& norm, const at::Tensor& x) { return norm_impl(norm, x, false); }
at::Tensor group_norm_silu(nn::GroupNorm& norm, const at::Tensor& x) { return norm_impl(norm, x, true); }

namespace {
// SiLU(GroupNorm(x + e[:, :, None, None])) for e [N, C] or [1, C] (one timestep for the batch, see UNet2DModel): the
// fused kernels add e as they read x; otherwise e is added to x in place (x is a temporary whose producer's backward
// does not need it, such as a convolution's output).
at::Tensor group_norm_silu_after_add(nn::GroupNorm& norm, at::Tensor x, const at::Tensor& e) {
  if (fused_norm_here(x)) {
    const at::Tensor rows = e.size(0) == x.size(0) ? e : e.expand({x.size(0), e.size(1)});  // rows 0 apart
    return fused_group_norm(x, norm->options.num_groups(), norm->weight, norm->bias, norm->options.eps(), true, rows);
  }
  x.add_(e.unsqueeze(-1).unsqueeze(-1));
  return norm_impl(norm, x, true);
}
}  // namespace

// ---------------------------------------------------------------------------------------------
ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels,
                                     int64_t groups, double eps, double dropout_p, double output_scale_factor)
    : output_scale_factor_(output_scale_factor), dropout_p_(dropout_p) {
  norm1 = register_module("norm1", nn::GroupNorm(nn::GroupNormOptions(groups, in_channels).eps(eps)));
  conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(in_channels, out_channels, 3).padding(1)));
  time_emb_proj = register_module("time_emb_proj", nn::Linear(temb_channels, out_channels));
  norm2 = register_module("norm2", nn::GroupNorm(nn::GroupNormOptions(groups, out_channels).eps(eps)));
  conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(out_channels, out_channels, 3).padding(1)));
  if (in_channels != out_channels) {
    conv_shortcut =
        register_module("conv_shortcut", nn::Conv2d(nn::Conv2dOptions(in_channels, out_channels, 1)));
  }
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb_act) {
  at::Tensor h = group_norm_silu(norm1, x);
  // time_embedding_norm "default": additive, broadcast over H, W (inside the fused normalization, or in place: conv1's
  // backward does not need its output).
  const at::Tensor& rows = embedding_rows();
  if (const at::Tensor* batched = nn_detail::time_addend(this)) {
    ++g_batched_time_addend_calls;
    // Projected with every other resnet's, conv1's bias included (TimeAddendsScope): conv1's bias is per
    // channel like the embedding, so it joins the addend the fused kernels add as they read, instead of a
    // pass of its own and a reduction for its gradient; where the kernels do not take h the addend is added
    // in place.
    h = keep_layout(
        at::conv2d(h, conv1->weight, at::Tensor(), /*stride=*/1, /*padding=*/1));  // as constructed
    h = group_norm_silu_after_add(norm2, h, rows.defined() ? batched->index_select(0, rows) : *batched);
  } else {
    at::Tensor e = time_emb_proj->forward(temb_act);
    if (rows.defined()) e = e.index_select(0, rows);
    h = group_norm_silu_after_add(norm2, conv3x3(conv1, h), e);
  }
  if (dropout_p_ > 0.0 && is_training()) h = nn_detail::dropout(h, dropout_p_);
  h = conv3x3(conv2, h);
  if (conv_shortcut) {
    h = conv1x1(x, conv_shortcut->weight, conv_shortcut->bias, h, /*residual_is_scratch=*/true);
  } else {
    h.add_(x);
  }
  if (output_scale_factor_ != 1.0) h.div_(output_scale_factor_);
  return h;
}

// ---------------------------------------------------------------------------------------------
AttentionImpl::AttentionImpl(int64_t channels, int64_t heads, int64_t head_dim, int64_t groups, double eps,
                             double rescale_output_factor)
    : heads_(heads), head_dim_(head_dim), rescale_output_factor_(rescale_output_factor) {
  const int64_t inner = heads * head_dim;
  group_norm = register_module("group_norm", nn::GroupNorm(nn::GroupNormOptions(groups, channels).eps(eps)));
  to_q = register_module("to_q", nn::Linear(channels, inner));
  to_k = register_module("to_k", nn::Linear(channels, inner));
  to_v = register_module("to_v", nn::Linear(channels, inner));
  out_proj = nn::Linear(inner, channels);
  to_out = nn::ModuleList();
  to_out->push_back(out_proj);
  to_out->push_back(nn::Dropout(nn::DropoutOptions(0.0)));
  to_out = register_module("to_out", to_out);
}

at::Tensor AttentionImpl::forward(const at::Tensor& x) {
  const int64_t n = x.size(0), height = x.size(2), width = x.size(3);
  const int64_t len = height * width, inner = heads_ * head_dim_;
  const at::Tensor h = nn_detail::group_norm(group_norm, x);
  // to_q/to_k/to_v as 1x1 convolutions: the same Linear over the H*W tokens, but channel-major and
  // on the convolution kernels (cuDNN, oneDNN; float32 channel-major on a CPU: its sgemm, see conv1x1) instead of a
  // BLAS GEMM with layout copies.
  auto project = [&](const nn::Linear& linear) {
    return conv1x1(h, linear->weight, linear->bias);
  };
  // [N, inner, H, W] -> [N, heads, L, d] as a view (channel-major memory, no copy).
  auto split_heads = [&](const at::Tensor& t) { return t.view({n, heads_, head_dim_, len}).transpose(2, 3); };
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  // SDPA on LibTorch 2.x, except on a CPU with oneDNN's sgemm at hand: the explicit path's products run on it, while
  // LibTorch's CPU kernels for SDPA call the BLAS LibTorch was built with (Debian's reference BLAS made them half of
  // LibTorch 2.6's sampling time).
  const bool sdpa = unet_has_sdpa() && !(x.device().is_cpu() && nn_detail::has_fast_cpu_gemm());
  at::Tensor q, k, v;
  if (nn_detail::fused_qkv_here(h, to_q, to_k, to_v)) {
    // One 1x1 convolution for the three projections (their weights and biases stacked each call): one GEMM
    // and one bias pass instead of three, and backward one data gradient instead of three added up; split's
    // backward is one concatenation.
    ++nn_detail::g_fused_qkv_calls;
    const std::vector<at::Tensor> qkv = conv1x1(h, at::cat({to_q->weight, to_k->weight, to_v->weight}),
                                                at::cat({to_q->bias, to_k->bias, to_v->bias}))
                                            .split(inner, 1);
    q = qkv[0];
    k = qkv[1];
    v = qkv[2];
  } else {
    q = project(to_q);
    k = project(to_k);
    v = project(to_v);
  }
  at::Tensor o = attention(split_heads(q), split_heads(k), split_heads(v), scale, sdpa);
  // Back to [N, inner, H, W] (a view when attention() returned channel-major memory), then to_out.0.
  o = keep_layout(o.transpose(2, 3).reshape({n, inner, height, width}));
  o = conv1x1(o, out_proj->weight, out_proj->bias, x);  // plus the residual
  if (rescale_output_factor_ != 1.0) o.div_(rescale_output_factor_);
  return o;
}

// ---------------------------------------------------------------------------------------------
Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t padding) : pad_right_bottom_(padding == 0) {
  conv = register_module("conv",
                         nn::Conv2d(nn::Conv2dOptions(channels, channels, 3).stride(2).padding(padding)));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  if (pad_right_bottom_) return keep_layout(conv->forward(at::constant_pad_nd(x, {0, 1, 0, 1}, 0)));
  return keep_layout(conv->forward(x));
}

Upsample2DImpl::Upsample2DImpl(int64_t channels) {
  conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(channels, channels, 3).padding(1)));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x) {
  // F.interpolate(scale_factor=2.0, mode="nearest")
  at::Tensor up = at::upsample_nearest2d(x, {2 * x.size(2), 2 * x.size(3)}, 2.0, 2.0);
  return conv3x3(conv, up);
}

// ---------------------------------------------------------------------------------------------
namespace {

// Fills resnets (and attentions) for one block and registers them as diffusers does: "attentions"
// first when present, then "resnets".
void build_layers(nn::Module& block, const BlockSpec& s, int64_t num_attentions,
                  std::vector<ResnetBlock2D>& resnets, std::vector<Attention>& attentions) {
  if (s.attention && num_attentions > 0) {
    nn::ModuleList list;
    for (int64_t i = 0; i < num_attentions; ++i) {
      attentions.emplace_back(s.out_channels, s.heads, s.head_dim, s.attn_groups, s.eps,
                              s.output_scale_factor);
      list->push_back(attentions.back());
    }
    block.register_module("attentions", list);
  }
  nn::ModuleList list;
  for (int64_t in : s.resnet_in) {
    resnets.emplace_back(in, s.out_channels, s.temb_channels, s.groups, s.eps, s.dropout,
                         s.output_scale_factor);
    list->push_back(resnets.back());
  }
  block.register_module("resnets", list);
}

}  // namespace

DownBlockImpl::DownBlockImpl(const BlockSpec& spec) {
  build_layers(*this, spec, static_cast<int64_t>(spec.resnet_in.size()), resnets_, attentions_);
  if (spec.downsample) {
    downsampler_ = Downsample2D(spec.out_channels, spec.downsample_padding);
    nn::ModuleList list;
    list->push_back(downsampler_);
    register_module("downsamplers", list);
  }
}

at::Tensor DownBlockImpl::forward(at::Tensor x, const at::Tensor& temb_act, std::vector<at::Tensor>& skips) {
  for (size_t i = 0; i < resnets_.size(); ++i) {
    x = resnets_[i]->forward(x, temb_act);
    if (!attentions_.empty()) x = attentions_[i]->forward(x);
    skips.push_back(x);
  }
  if (downsampler_) {
    x = downsampler_->forward(x);
    skips.push_back(x);
  }
  return x;
}

UpBlockImpl::UpBlockImpl(const BlockSpec& spec) {
  build_layers(*this, spec, static_cast<int64_t>(spec.resnet_in.size()), resnets_, attentions_);
  if (spec.upsample) {
    upsampler_ = Upsample2D(spec.out_channels);
    nn::ModuleList list;
    list->push_back(upsampler_);
    register_module("upsamplers", list);
  }
}

at::Tensor UpBlockImpl::forward(at::Tensor x, const at::Tensor& temb_act, std::vector<at::Tensor>& skips) {
  for (size_t i = 0; i < resnets_.size(); ++i) {
    // U-Net skip connection: channels [x, skip], the skip taken from the end of the down path.
    x = at::cat({x, skips.back()}, 1);
    skips.pop_back();
    x = resnets_[i]->forward(x, temb_act);
    if (!attentions_.empty()) x = attentions_[i]->forward(x);
  }
  if (upsampler_) x = upsampler_->forward(x);
  return x;
}

MidBlockImpl::MidBlockImpl(const BlockSpec& spec) {
  build_layers(*this, spec, static_cast<int64_t>(spec.resnet_in.size()) - 1, resnets_, attentions_);
}

at::Tensor MidBlockImpl::forward(at::Tensor x, const at::Tensor& temb_act) {
  x = resnets_[0]->forward(x, temb_act);
  for (size_t i = 1; i < resnets_.size(); ++i) {
    if (!attentions_.empty()) x = attentions_[i - 1]->forward(x);
    x = resnets_[i]->forward(x, temb_act);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Transformer sinusoidal position embedding as diffusers' get_timestep_embedding (float32 throughout).
at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                              int64_t freq_shift) {
  const int64_t half = dim / 2;
  at::TensorOptions opts = at::TensorOptions().dtype(at::kFloat).device(timesteps.device());
  at::Tensor exponent = at::arange(half, opts) * (-std::log(10000.0));
  exponent = exponent / (half - freq_shift);
  at::Tensor arg = timesteps.to(at::kFloat).unsqueeze(1) * exponent.exp().unsqueeze(0);
  at::Tensor emb = flip_sin_to_cos ? at::cat({arg.cos(), arg.sin()}, 1) : at::cat({arg.sin(), arg.cos()}, 1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1}, 0);
  return emb;
}

}  // namespace nn_detail

void set_reduced_precision_norm(bool on) { nn_detail::g_reduced_norm = on; }
bool reduced_precision_norm() { return nn_detail::g_reduced_norm; }

// ---------------------------------------------------------------------------------------------
bool unet_has_sdpa() {
#if TORCH_VERSION_MAJOR >= 2
  return true;
#else
  return false;
#endif
}

// Scaled dot-product attention (Vaswani et al. 2017, eq. 1) on [B, heads, L, d].
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                     bool use_sdpa) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || q.size(0) != k.size(0) || q.size(1) != k.size(1) ||
      q.size(3) != k.size(3) || v.size(0) != k.size(0) || v.size(1) != k.size(1) || v.size(2) != k.size(2)) {
    throw input_error(
        "attention: q, k, v must be [B, heads, L, d] with the same B and heads, q and k the same d, "
        "k and v the same L");
  }
#if TORCH_VERSION_MAJOR >= 2
  // The fused kernels' backward accumulates with atomics: deterministic training takes the explicit path.
  if (use_sdpa && !(at::GradMode::is_enabled() && at::globalContext().deterministicAlgorithms())) {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 1
    // The fused kernels want the last dimension contiguous. Channels-last activations give that as views
    // ([N, H*W, heads, d] memory); channel-major ones are copied.
    auto dense_last = [](const at::Tensor& t) {
      return nn_detail::channels_last_active() && t.stride(-1) == 1 ? t : t.contiguous();
    };
    return at::scaled_dot_product_attention(dense_last(q), dense_last(k), dense_last(v), {}, 0.0, false, scale);
#else
    // 2.0 has no scale argument: it uses 1/sqrt(d), so fold the requested scale into q.
    return at::scaled_dot_product_attention(
        (q * (scale * std::sqrt(static_cast<double>(q.size(-1))))).contiguous(), k.contiguous(),
        v.contiguous());
#endif
  }
#endif
  // Explicit path. Batched GEMMs take transposed operands without copies, so q, k, v may be strided
  // views (the attention block passes channel-major [B, heads, d, L] memory seen as [B, heads, L, d]).
  const int64_t b = q.size(0) * q.size(1), lq = q.size(2), lk = k.size(2), d = q.size(3), dv = v.size(3);
  at::Tensor q3 = q.reshape({b, lq, d});
  at::Tensor k3 = k.reshape({b, lk, d});
  at::Tensor v3 = v.reshape({b, lk, dv});
  if (!at::GradMode::is_enabled() && q.device().is_cpu()) {
    return nn_detail::attention_inference_cpu(q3, k3, v3, scale).view({q.size(0), q.size(1), lq, dv});
  }
  // Scores as diffusers' get_attention_scores (baddbmm with beta 0, alpha = scale).
  at::Tensor scores = nn_detail::batched_matmul(q3, k3.transpose(1, 2), scale);
  if (scores.scalar_type() == at::kHalf || scores.scalar_type() == at::kBFloat16) {
    // Reduced precision (autocast): softmax in float32 (diffusers' upcast_softmax), then P V in the
    // plain order, which keeps the softmax's incoming gradient contiguous (the transposed form below
    // sends LibTorch's bf16 softmax backward down a strided path 4x slower).
    at::Tensor probs = at::softmax(scores.to(at::kFloat), -1).to(scores.scalar_type());
    return at::bmm(probs, v3).view({q.size(0), q.size(1), lq, dv});
  }
  at::Tensor probs = at::softmax(scores, -1);
  // (P V)^T = V^T P^T: the result lands channel-major ([B, dv, Lq] memory), returned as [B, heads, Lq, dv].
  at::Tensor out = nn_detail::batched_matmul(v3.transpose(1, 2), probs.transpose(1, 2), 1.0).transpose(1, 2);
  return out.view({q.size(0), q.size(1), lq, dv});
}

}  // namespace diffuse
