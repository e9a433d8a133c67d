// 3x3 convolutions for CPU inference through oneDNN's Winograd kernels (Lavin & Gray 2016, F(4x4, 3x3)): about
// a third of the multiplications of the direct method. LibTorch's CPU convolution only ever asks oneDNN for the
// direct algorithm; on the fmnist U-Net's shapes at batch 64 Winograd (with the NCHW <-> blocked reorders) is
// 1.3-2.3x faster, with a relative error of ~2e-6 against it.
#include "nn/blocks.h"


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
std::atomic<int64_t> g_winograd_calls{0};
}  // namespace

void set_cpu_winograd(bool on) { g_winograd = on; }
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

// One shape's primitives: the convolution and the reorders between the user's NCHW and its blocked layout.
struct Plan {
  bool supported = false;
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward conv;
  memory::desc user_src, user_dst, user_wei, bias;
  dnnl::reorder src_in, dst_out;
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
  auto p = std::make_shared<Plan>();
  const auto f32 = memory::data_type::f32;
  const memory::dims src{s.n, s.ic, s.h, s.w}, wei{s.oc, s.ic, 3, 3}, dst{s.n, s.oc, s.h, s.w};
  p->user_src = memory::desc(src, f32, memory::format_tag::nchw);
  p->user_dst = memory::desc(dst, f32, memory::format_tag::nchw);
  p->user_wei = memory::desc(wei, f32, memory::format_tag::oihw);
  p->bias = memory::desc({s.oc}, f32, memory::format_tag::x);
  try {
    const memory::desc src_any(src, f32, memory::format_tag::any), wei_any(wei, f32, memory::format_tag::any),
        dst_any(dst, f32, memory::format_tag::any);
    const memory::dims stride{1, 1}, pad{1, 1};
    auto desc = s.bias ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_winograd,
                                                         src_any, wei_any, p->bias, dst_any, stride, pad, pad)
                       : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_winograd,
                                                         src_any, wei_any, dst_any, stride, pad, pad);
    p->pd = dnnl::convolution_forward::primitive_desc(desc, st.engine);
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
}  // namespace
}  // namespace nn_detail

#endif

namespace nn_detail {

at::Tensor conv3x3(torch::nn::Conv2d conv, const at::Tensor& x) {
  if (winograd_applies(x, conv->weight)) {
    at::Tensor y = conv3x3_winograd(x, conv->weight, conv->bias);
    if (y.defined()) return y;
  }
  return conv->forward(x);
}

}  // namespace nn_detail
}  // namespace diffuse
