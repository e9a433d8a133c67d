// 3x3 convolutions on the CPU through oneDNN's Winograd kernels (Lavin & Gray 2016, F(4x4, 3x3)): about
// a third of the multiplications of the direct method. LibTorch's CPU convolution only ever asks oneDNN for the
// direct algorithm; on the fmnist U-Net's shapes at batch 64 Winograd (with the NCHW <-> blocked reorders) is
// 1.3-2.3x faster, with a relative error of ~2e-6 against it.
// Inference (no autograd): the forward_inference kernel with the weights reordered once per weight tensor.
// Training: an autograd function with oneDNN's Winograd forward_training, backward-data and backward-weights
// kernels (1.1-1.5x faster than its direct ones on the fmnist U-Net's shapes, reorders included); the weights
// change every step and are reordered on every call.
// Where oneDNN 2 has no kernel (other builds, other CPUs, other shapes), conv3x3 takes the project's own F(4x4, 3x3)
// kernels (src/nn/winograd_f43.cpp); set_cpu_winograd_kernel picks one side for comparisons.
#include "nn/blocks.h"

#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "diffuse/common.h"
#include "diffuse/nn/precision.h"
#include "diffuse/nn/unet.h"

#if defined(DIFFUSE_HAVE_DNNL) && __has_include(<oneapi/dnnl/dnnl.hpp>)
#include <oneapi/dnnl/dnnl.hpp>
#if DNNL_VERSION_MAJOR == 2
#define DIFFUSE_WINOGRAD 1
#endif
#endif

namespace diffuse {

namespace {
std::atomic<bool> g_winograd{false};
std::atomic<CpuWinogradKernel> g_kernel{CpuWinogradKernel::kAuto};
std::atomic<int64_t> g_winograd_calls{0};
}  // namespace

void set_cpu_winograd(bool on) { g_winograd = on; }
void set_cpu_winograd_kernel(CpuWinogradKernel kernel) { g_kernel = kernel; }
CpuWinogradKernel cpu_winograd_kernel() { return g_kernel; }
bool cpu_winograd() { return g_winograd; }
int64_t cpu_winograd_calls() { return g_winograd_calls; }

#ifdef DIFFUSE_WINOGRAD

bool cpu_winograd_built() { return true; }

namespace nn_detail {
namespace {

using dnnl::memory;

struct Shape {
  int64_t n, ic, oc, h, w;
  bool bias;
  bool operator==(const Shape& o) const {
    return n == o.n && ic == o.ic && oc == o.oc && h == o.h && w == o.w && bias == o.bias;
  }
};
struct ShapeHash {
  size_t operator()(const Shape& s) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : {s.n, s.ic, s.oc, s.h, s.w, static_cast<int64_t>(s.bias)}) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

// A shape's operands in LibTorch's layouts (NCHW, OIHW, the bias), and as `any`: the primitive picks its own.
struct Layouts {
  memory::desc user_src, user_dst, user_wei, bias;
  memory::desc src_any, wei_any, dst_any;
  explicit Layouts(const Shape& s) {
    const auto f32 = memory::data_type::f32;
    const memory::dims src{s.n, s.ic, s.h, s.w}, wei{s.oc, s.ic, 3, 3}, dst{s.n, s.oc, s.h, s.w};
    user_src = memory::desc(src, f32, memory::format_tag::nchw);
    user_dst = memory::desc(dst, f32, memory::format_tag::nchw);
    user_wei = memory::desc(wei, f32, memory::format_tag::oihw);
    bias = memory::desc({s.oc}, f32, memory::format_tag::x);
    src_any = memory::desc(src, f32, memory::format_tag::any);
    wei_any = memory::desc(wei, f32, memory::format_tag::any);
    dst_any = memory::desc(dst, f32, memory::format_tag::any);
  }
};

const memory::dims kStride{1, 1}, kPad{1, 1};

dnnl::convolution_forward::desc winograd_forward(dnnl::prop_kind kind, const Layouts& l, bool bias) {
  const auto wino = dnnl::algorithm::convolution_winograd;
  return bias ? dnnl::convolution_forward::desc(kind, wino, l.src_any, l.wei_any, l.bias, l.dst_any, kStride, kPad, kPad)
              : dnnl::convolution_forward::desc(kind, wino, l.src_any, l.wei_any, l.dst_any, kStride, kPad, kPad);
}

// One shape's primitives: the convolution and the reorders between the user's NCHW and its blocked layout.
struct Plan : Layouts {
  using Layouts::Layouts;
  bool supported = false;
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward conv;
  dnnl::reorder src_in, dst_out;
};

// One shape's training primitives. Each takes its operands in its own blocked layouts; the reorders from and to
// LibTorch's NCHW / OIHW are made per call (dnnl::reorder between two memory descriptors).
struct TrainPlan : Layouts {
  using Layouts::Layouts;
  bool supported = false;
  dnnl::convolution_forward::primitive_desc fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights;
  dnnl::convolution_forward fwd_prim;
  dnnl::convolution_backward_data bwd_data_prim;
  dnnl::convolution_backward_weights bwd_weights_prim;
};

// Weights in the primitive's own layout, reordered once per weight tensor and kept while that tensor lives
// unchanged (same storage, same version counter).
struct Weights {
  c10::weak_intrusive_ptr<c10::TensorImpl> owner{c10::intrusive_ptr<c10::TensorImpl>()};
  const void* data = nullptr;
  int64_t version = -1;
  memory::desc md;
  at::Tensor buffer;
};

struct State {
  std::mutex mutex;
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::unordered_map<Shape, std::shared_ptr<Plan>, ShapeHash> plans;
  std::unordered_map<Shape, std::shared_ptr<TrainPlan>, ShapeHash> train_plans;
  std::unordered_map<const c10::TensorImpl*, Weights> weights;
  // The blocked input and output of the call in progress (calls hold the mutex): kept and grown to the largest
  // shape seen, so that the tens of MB of each call are not allocated and page-faulted in anew.
  at::Tensor src_scratch, dst_scratch;
};

State& state() {
  static State s;
  return s;
}

std::shared_ptr<Plan> plan_for(State& st, const Shape& s) {
  auto it = st.plans.find(s);
  if (it != st.plans.end()) return it->second;
  auto p = std::make_shared<Plan>(s);
  try {
    p->pd = dnnl::convolution_forward::primitive_desc(winograd_forward(dnnl::prop_kind::forward_inference, *p, s.bias),
                                                      st.engine);
    p->conv = dnnl::convolution_forward(p->pd);
    p->src_in = dnnl::reorder(dnnl::reorder::primitive_desc(st.engine, p->user_src, st.engine, p->pd.src_desc()));
    p->dst_out = dnnl::reorder(dnnl::reorder::primitive_desc(st.engine, p->pd.dst_desc(), st.engine, p->user_dst));
    p->supported = true;
  } catch (const dnnl::error&) {
    p->supported = false;  // this CPU or shape has no Winograd kernel (e.g. channels not a multiple of 16)
  }
  st.plans.emplace(s, p);
  return p;
}

at::Tensor bytes(size_t n) { return at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte)); }

void* scratch(at::Tensor& buffer, size_t n) {
  if (!buffer.defined() || static_cast<size_t>(buffer.numel()) < n) buffer = bytes(n);
  return buffer.data_ptr();
}

const memory::desc& weights_for(State& st, const Plan& p, const at::Tensor& w, at::Tensor& buffer) {
  c10::TensorImpl* impl = w.unsafeGetTensorImpl();
  auto it = st.weights.find(impl);
  if (it != st.weights.end()) {
    Weights& e = it->second;
    if (e.owner.lock().get() == impl && e.data == w.data_ptr() && e.version == static_cast<int64_t>(w._version()) &&
        e.md == p.pd.weights_desc()) {
      buffer = e.buffer;
      return e.md;
    }
    st.weights.erase(it);
  }
  // Entries whose tensors are gone would otherwise keep their buffers (and could match a new tensor's address).
  for (auto e = st.weights.begin(); e != st.weights.end();) e = e->second.owner.expired() ? st.weights.erase(e) : std::next(e);
  Weights e;
  e.owner = c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr());
  e.data = w.data_ptr();
  e.version = static_cast<int64_t>(w._version());
  e.md = p.pd.weights_desc();
  e.buffer = bytes(e.md.get_size());
  const at::Tensor wc = w.contiguous();
  memory user(p.user_wei, st.engine, const_cast<float*>(wc.data_ptr<float>()));
  memory mine(e.md, st.engine, e.buffer.data_ptr());
  dnnl::reorder(user, mine).execute(st.stream, user, mine);
  st.stream.wait();
  buffer = e.buffer;
  return st.weights.emplace(impl, std::move(e)).first->second.md;
}

std::shared_ptr<TrainPlan> train_plan_for(State& st, const Shape& s) {
  auto it = st.train_plans.find(s);
  if (it != st.train_plans.end()) return it->second;
  auto p = std::make_shared<TrainPlan>(s);
  try {
    const auto wino = dnnl::algorithm::convolution_winograd;
    p->fwd = dnnl::convolution_forward::primitive_desc(winograd_forward(dnnl::prop_kind::forward_training, *p, s.bias),
                                                       st.engine);
    p->bwd_data = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(wino, p->src_any, p->wei_any, p->dst_any, kStride, kPad, kPad), st.engine,
        p->fwd);
    // Backward-weights: Winograd where oneDNN has it for the shape, else its direct kernel.
    for (const auto alg : {wino, dnnl::algorithm::convolution_direct}) {
      try {
        auto wd = s.bias ? dnnl::convolution_backward_weights::desc(alg, p->src_any, p->wei_any, p->bias, p->dst_any, kStride,
                                                                    kPad, kPad)
                         : dnnl::convolution_backward_weights::desc(alg, p->src_any, p->wei_any, p->dst_any, kStride, kPad, kPad);
        p->bwd_weights = dnnl::convolution_backward_weights::primitive_desc(wd, st.engine, p->fwd);
        break;
      } catch (const dnnl::error&) {
        if (alg != wino) throw;
      }
    }
    p->fwd_prim = dnnl::convolution_forward(p->fwd);
    p->bwd_data_prim = dnnl::convolution_backward_data(p->bwd_data);
    p->bwd_weights_prim = dnnl::convolution_backward_weights(p->bwd_weights);
    p->supported = true;
  } catch (const dnnl::error&) {
    p->supported = false;
  }
  st.train_plans.emplace(s, p);
  return p;
}

// A oneDNN memory over a contiguous float tensor (user layout), or over a new byte buffer in the primitive's layout
// (which the buffer keeps alive).
memory user_memory(const memory::desc& md, const State& st, const at::Tensor& t) {
  return memory(md, st.engine, const_cast<float*>(t.data_ptr<float>()));
}
memory own_memory(const memory::desc& md, const State& st, at::Tensor& keep) {
  keep = bytes(md.get_size());
  return memory(md, st.engine, keep.data_ptr());
}
// `user` in `md`'s layout: the same memory when the layouts agree, else a reordered copy.
memory in_layout(State& st, memory user, const memory::desc& md, at::Tensor& keep) {
  if (user.get_desc() == md) return user;
  memory mine = own_memory(md, st, keep);
  dnnl::reorder(user, mine).execute(st.stream, user, mine);
  return mine;
}

Shape train_shape(const at::Tensor& x, const at::Tensor& w, bool bias) {
  return Shape{x.size(0), x.size(1), w.size(0), x.size(2), x.size(3), bias};
}

struct WinogradConv3x3 : public torch::autograd::Function<WinogradConv3x3> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_in,
                            const at::Tensor& b_in) {
    const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
    const at::Tensor b = b_in.defined() ? b_in.contiguous() : b_in;
    save_conv3x3(ctx, x, w, b);
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    std::shared_ptr<TrainPlan> p = train_plan_for(st, train_shape(x, w, b.defined()));
    at::Tensor out = at::empty({x.size(0), w.size(0), x.size(2), x.size(3)}, x.options());
    at::Tensor keep_src, keep_wei, keep_dst;
    memory src = in_layout(st, user_memory(p->user_src, st, x), p->fwd.src_desc(), keep_src);
    memory wei = in_layout(st, user_memory(p->user_wei, st, w), p->fwd.weights_desc(), keep_wei);
    memory user_dst = user_memory(p->user_dst, st, out);
    memory dst = p->fwd.dst_desc() == p->user_dst ? user_dst : own_memory(p->fwd.dst_desc(), st, keep_dst);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
    if (b.defined()) args.emplace(DNNL_ARG_BIAS, user_memory(p->bias, st, b));
    p->fwd_prim.execute(st.stream, args);
    if (keep_dst.defined()) dnnl::reorder(dst, user_dst).execute(st.stream, dst, user_dst);
    st.stream.wait();
    ++g_winograd_calls;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto [x, w, gy, has_bias] = saved_conv3x3(ctx, grads);
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    std::shared_ptr<TrainPlan> p = train_plan_for(st, train_shape(x, w, has_bias));
    at::Tensor gx, gw, gb;
    at::Tensor keep_a, keep_b, keep_c;
    memory user_gy = user_memory(p->user_dst, st, gy);
    memory diff_dst_data = user_gy;  // the output gradient in backward-data's layout, once reordered
    if (ctx->needs_input_grad(0)) {
      gx = at::empty_like(x);
      memory diff_dst = in_layout(st, user_gy, p->bwd_data.diff_dst_desc(), keep_a);
      diff_dst_data = diff_dst;
      memory wei = in_layout(st, user_memory(p->user_wei, st, w), p->bwd_data.weights_desc(), keep_b);
      memory user_gx = user_memory(p->user_src, st, gx);
      memory diff_src = p->bwd_data.diff_src_desc() == p->user_src ? user_gx : own_memory(p->bwd_data.diff_src_desc(), st, keep_c);
      p->bwd_data_prim.execute(st.stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_SRC, diff_src}});
      if (keep_c.defined()) dnnl::reorder(diff_src, user_gx).execute(st.stream, diff_src, user_gx);
      st.stream.wait();
    }
    if (ctx->needs_input_grad(1) || (has_bias && ctx->needs_input_grad(2))) {
      gw = at::empty_like(w);
      at::Tensor keep_d, keep_e, keep_f;
      memory src = in_layout(st, user_memory(p->user_src, st, x), p->bwd_weights.src_desc(), keep_d);
      // Backward-weights usually takes the output gradient in backward-data's layout: reordered once for both.
      memory diff_dst = diff_dst_data.get_desc() == p->bwd_weights.diff_dst_desc()
                            ? diff_dst_data
                            : in_layout(st, user_gy, p->bwd_weights.diff_dst_desc(), keep_e);
      memory user_gw = user_memory(p->user_wei, st, gw);
      memory diff_wei = p->bwd_weights.diff_weights_desc() == p->user_wei
                            ? user_gw
                            : own_memory(p->bwd_weights.diff_weights_desc(), st, keep_f);
      std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_wei}};
      if (has_bias) {
        gb = at::empty({w.size(0)}, w.options());
        args.emplace(DNNL_ARG_DIFF_BIAS, user_memory(p->bias, st, gb));
      }
      p->bwd_weights_prim.execute(st.stream, args);
      if (keep_f.defined()) dnnl::reorder(diff_wei, user_gw).execute(st.stream, diff_wei, user_gw);
      st.stream.wait();
      if (!ctx->needs_input_grad(1)) gw = at::Tensor();
      if (!(has_bias && ctx->needs_input_grad(2))) gb = at::Tensor();
    }
    return {gx, gw, gb};
  }
};

// Whether a training-mode call (autograd recording) takes the Winograd training path.
bool winograd_training_applies(const at::Tensor& x, const at::Tensor& w) {
  return g_winograd && at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad()) && x.device().is_cpu() &&
         w.device().is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         !autocast_active(c10::Device(c10::kCPU)) && x.dim() == 4 && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 &&
         w.size(1) == x.size(1);
}

// The training path's result, or an undefined tensor where oneDNN has no Winograd kernel for the shape.
at::Tensor conv3x3_winograd_training(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  {
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    if (!train_plan_for(st, train_shape(x, w, b.defined()))->supported) return at::Tensor();
  }
  return WinogradConv3x3::apply(x, w, b);
}

// Whether x would take the Winograd path; conv3x3_winograd returns an undefined tensor where oneDNN has no
// Winograd kernel for the shape.
bool winograd_applies(const at::Tensor& x, const at::Tensor& w) {
  return g_winograd && !at::GradMode::is_enabled() && x.device().is_cpu() && x.scalar_type() == at::kFloat &&
         w.scalar_type() == at::kFloat && !autocast_active(c10::Device(c10::kCPU)) && x.dim() == 4 && w.dim() == 4 &&
         w.size(2) == 3 && w.size(3) == 3 && w.size(1) == x.size(1) && !x.requires_grad();
}

at::Tensor conv3x3_winograd(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  const at::Tensor x = x_in.contiguous();
  const Shape s{x.size(0), x.size(1), w.size(0), x.size(2), x.size(3), b.defined()};
  std::shared_ptr<Plan> p = plan_for(st, s);
  if (!p->supported) return at::Tensor();
  at::Tensor wbuf;
  const memory::desc& wmd = weights_for(st, *p, w, wbuf);
  at::Tensor out = at::empty({s.n, s.oc, s.h, s.w}, x.options());
  memory user_src(p->user_src, st.engine, const_cast<float*>(x.data_ptr<float>()));
  memory user_dst(p->user_dst, st.engine, out.data_ptr<float>());
  memory src(p->pd.src_desc(), st.engine, scratch(st.src_scratch, p->pd.src_desc().get_size()));
  memory dst(p->pd.dst_desc(), st.engine, scratch(st.dst_scratch, p->pd.dst_desc().get_size()));
  memory wei(wmd, st.engine, wbuf.data_ptr());
  p->src_in.execute(st.stream, user_src, src);
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
  at::Tensor bc;
  if (b.defined()) {
    bc = b.contiguous();
    args.emplace(DNNL_ARG_BIAS, memory(p->bias, st.engine, const_cast<float*>(bc.data_ptr<float>())));
  }
  p->conv.execute(st.stream, args);
  p->dst_out.execute(st.stream, dst, user_dst);
  st.stream.wait();
  ++g_winograd_calls;
  return out;
}

}  // namespace
}  // namespace nn_detail

#else  // built without oneDNN's headers (or a oneDNN other than 2.x)

bool cpu_winograd_built() { return false; }

namespace nn_detail {
namespace {
bool winograd_applies(const at::Tensor&, const at::Tensor&) { return false; }
at::Tensor conv3x3_winograd(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return at::Tensor(); }
bool winograd_training_applies(const at::Tensor&, const at::Tensor&) { return false; }
at::Tensor conv3x3_winograd_training(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return at::Tensor(); }
}  // namespace
}  // namespace nn_detail

#endif

namespace nn_detail {

at::Tensor conv3x3(torch::nn::Conv2d conv, const at::Tensor& x) {
  // Channels-last activations take LibTorch's convolution (oneDNN/cuDNN in NHWC); the Winograd path is NCHW.
  if (channels_last_active()) return keep_layout(conv->forward(x));
  if (!g_winograd) return conv->forward(x);
  const CpuWinogradKernel kernel = g_kernel;
  // kAuto: the own kernels first. On the fmnist U-Net (2 AVX-512 cores, bench_cpu_kernels) they match oneDNN 2's in
  // training and are up to 1.4x faster in inference at 14x14 and 7x7: a whole sampling run 0.92x the time and 150 MB
  // less memory, training 0.99x. oneDNN 2's then take what the own ones do not.
  if (kernel != CpuWinogradKernel::kOneDnn && f43_applies(x, conv->weight)) {
    ++g_winograd_calls;
    return conv3x3_f43(x, conv->weight, conv->bias);
  }
  if (kernel != CpuWinogradKernel::kOwn) {
    if (winograd_applies(x, conv->weight)) {
      at::Tensor y = conv3x3_winograd(x, conv->weight, conv->bias);
      if (y.defined()) return y;
    } else if (winograd_training_applies(x, conv->weight)) {
      at::Tensor y = conv3x3_winograd_training(x, conv->weight, conv->bias);
      if (y.defined()) return y;
    }
  }
  // The thin kernels for one output channel only (conv_out: 2.7x faster than oneDNN's in inference, 2.0x in training
  // at batch 64). With one input channel (conv_in) oneDNN's direct convolution is faster (bench_cpu_kernels: 0.59 vs
  // 1.12 ms in inference, 4.2 vs 4.3 ms in training).
  if (conv->weight.size(0) == 1 && thin_conv3x3_applies(x, conv->weight)) {
    return thin_conv3x3(x, conv->weight, conv->bias);
  }
  return conv->forward(x);
}

}  // namespace nn_detail
}  // namespace diffuse
