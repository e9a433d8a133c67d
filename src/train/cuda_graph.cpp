#include "diffuse/train/cuda_graph.h"

#include "diffuse/common.h"

#include <map>
#include <tuple>
#include <vector>

#if defined(DIFFUSE_HAVE_CUDA) && __has_include(<ATen/cuda/CUDAGraph.h>) && __has_include(<cuda_runtime_api.h>)
#define DIFFUSE_CUDA_GRAPHS 1
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/cuda.h>
#endif

namespace diffuse {

#ifdef DIFFUSE_CUDA_GRAPHS

bool cuda_graphs_built() { return true; }

namespace {

c10::DeviceIndex device_index(const c10::Device& device) {
  if (!device.is_cuda()) throw input_error("CUDA graphs need a CUDA device, not " + device.str());
  return device.has_index() ? device.index() : c10::cuda::current_device();
}

// A stream from the pool, current while this lives (capture needs a stream other than the default one, and
// PyTorch wants the eager warm-up on that same stream). It starts after everything queued so far.
c10::cuda::CUDAStream stream_after_queued_work(c10::DeviceIndex index) {
  torch::cuda::synchronize(index);
  return c10::cuda::getStreamFromPool(false, index);
}
struct SideStream {
  explicit SideStream(c10::DeviceIndex index) : stream(stream_after_queued_work(index)), guard(stream) {}
  // Work queued on it finishes before the default stream is current again (called by the owners' destructors,
  // before their graphs go).
  void finish() noexcept {
    try {
      stream.synchronize();
    } catch (...) {
    }
  }
  c10::cuda::CUDAStream stream;
  c10::cuda::CUDAStreamGuard guard;
};

// Records body into graph on the current stream without running it. A failure ends the capture (a capture left
// open breaks every later CUDA call) and throws run_error "CUDA graph capture of WHAT failed (...); INSTEAD".
void capture_graph(at::cuda::CUDAGraph& graph, c10::DeviceIndex index, const std::function<void()>& body,
                   const std::string& what, const std::string& instead) {
  torch::cuda::synchronize(index);
  // Autocast's cache of cast weights would outlive the capture holding memory of the graph's pool.
  const bool cache = at::autocast::is_autocast_cache_enabled();
  at::autocast::set_autocast_cache_enabled(false);
  std::string failure;
  try {
    graph.capture_begin();
    try {
      body();
    } catch (const std::exception& e) {
      failure = e.what();
    }
    graph.capture_end();
  } catch (const std::exception& e) {
    if (failure.empty()) failure = e.what();
  }
  at::autocast::set_autocast_cache_enabled(cache);
  if (!failure.empty()) {
    throw run_error("CUDA graph capture of " + what + " failed (" + failure.substr(0, failure.find('\n')) + "); " +
                    instead);
  }
  // The eager warm-up's blocks sit cached in the allocator's general pool; the graph replays in its own pool.
  // Handing them back keeps the device memory a graphed run holds near one graph's.
  torch::cuda::synchronize(index);
  c10::cuda::CUDACachingAllocator::emptyCache();
}

// Inputs that select a graph: each tensor's sizes and dtype (an undefined one: empty).
using ShapeKey = std::vector<std::tuple<std::vector<int64_t>, int, bool>>;
ShapeKey shape_key(std::initializer_list<const at::Tensor*> ts) {
  ShapeKey k;
  for (const at::Tensor* t : ts) {
    if (t->defined()) {
      k.emplace_back(t->sizes().vec(), static_cast<int>(t->scalar_type()), true);
    } else {
      k.emplace_back(std::vector<int64_t>{}, 0, false);
    }
  }
  return k;
}

}  // namespace

struct CudaGraphStep::Impl {
  explicit Impl(c10::DeviceIndex index) : side(index) {}
  SideStream side;
  at::cuda::CUDAGraph graph;
  bool captured = false;
};

CudaGraphStep::CudaGraphStep(const c10::Device& device) : impl_(std::make_unique<Impl>(device_index(device))) {}

CudaGraphStep::~CudaGraphStep() { impl_->side.finish(); }

void CudaGraphStep::capture(const std::function<void()>& body) {
  if (impl_->captured) throw run_error("CUDA graph: the step is already captured");
  capture_graph(impl_->graph, impl_->side.stream.device_index(), body, "the training step",
                "train without --cuda-graph");
  impl_->captured = true;
}

bool CudaGraphStep::captured() const { return impl_->captured; }

void CudaGraphStep::replay() {
  if (!impl_->captured) throw run_error("CUDA graph: replay before capture");
  impl_->graph.replay();
}

struct CudaGraphFunction::Impl {
  Impl(Fn f, c10::DeviceIndex index, int64_t w) : fn(std::move(f)), warmup(w), side(index) {}
  struct Entry {
    int64_t eager_calls = 0;
    at::Tensor x, c, labels, out;  // the graph's fixed input buffers and its output
    std::unique_ptr<at::cuda::CUDAGraph> graph;
  };
  Fn fn;
  int64_t warmup;
  SideStream side;
  std::map<ShapeKey, Entry> entries;
  int64_t replays = 0;
};

CudaGraphFunction::CudaGraphFunction(Fn fn, const c10::Device& device, int64_t warmup) {
  const c10::DeviceIndex index = device_index(device);
  if (!fn) throw input_error("CudaGraphFunction: no function");
  impl_ = std::make_unique<Impl>(std::move(fn), index, std::max<int64_t>(warmup, 0));
}

CudaGraphFunction::~CudaGraphFunction() { impl_->side.finish(); }

at::Tensor CudaGraphFunction::operator()(const at::Tensor& x, const at::Tensor& c, const at::Tensor& labels) {
  Impl& m = *impl_;
  Impl::Entry& e = m.entries[shape_key({&x, &c, &labels})];
  if (!e.graph) {
    if (e.eager_calls < m.warmup) {
      ++e.eager_calls;
      return m.fn(x, c, labels);
    }
    e.x = x.clone();
    e.c = c.clone();
    if (labels.defined()) e.labels = labels.clone();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    try {
      capture_graph(*graph, m.side.stream.device_index(), [&] { e.out = m.fn(e.x, e.c, e.labels); },
                    "the network evaluation", "sample without --cuda-graph");
    } catch (...) {
      m.entries.clear();
      throw;
    }
    e.graph = std::move(graph);
  } else {
    e.x.copy_(x);
    e.c.copy_(c);
    if (labels.defined()) e.labels.copy_(labels);
  }
  e.graph->replay();
  ++m.replays;
  return e.out.clone();
}

int64_t CudaGraphFunction::graphs() const {
  int64_t n = 0;
  for (const auto& [key, e] : impl_->entries) n += e.graph != nullptr;
  return n;
}
int64_t CudaGraphFunction::replays() const { return impl_->replays; }

#else  // a LibTorch without CUDA

bool cuda_graphs_built() { return false; }

struct CudaGraphStep::Impl {};

CudaGraphStep::CudaGraphStep(const c10::Device&) {
  throw input_error("--cuda-graph needs diffuse built against a CUDA LibTorch; this build has none");
}
CudaGraphStep::~CudaGraphStep() = default;
void CudaGraphStep::capture(const std::function<void()>&) {}
bool CudaGraphStep::captured() const { return false; }
void CudaGraphStep::replay() {}

struct CudaGraphFunction::Impl {};
CudaGraphFunction::CudaGraphFunction(Fn, const c10::Device&, int64_t) {
  throw input_error("--cuda-graph needs diffuse built against a CUDA LibTorch; this build has none");
}
CudaGraphFunction::~CudaGraphFunction() = default;
at::Tensor CudaGraphFunction::operator()(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return {}; }
int64_t CudaGraphFunction::graphs() const { return 0; }
int64_t CudaGraphFunction::replays() const { return 0; }

#endif

}  // namespace diffuse
