#include "diffuse/train/cuda_graph.h"

#include "diffuse/common.h"

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

struct CudaGraphStep::Impl {
  explicit Impl(c10::DeviceIndex index) : stream(c10::cuda::getStreamFromPool(false, index)), guard(stream) {}
  c10::cuda::CUDAStream stream;
  c10::cuda::CUDAStreamGuard guard;  // the side stream is current while this lives
  at::cuda::CUDAGraph graph;
  bool captured = false;
};

namespace {
c10::DeviceIndex device_index(const c10::Device& device) {
  if (!device.is_cuda()) throw input_error("CUDA graphs need a CUDA device, not " + device.str());
  return device.has_index() ? device.index() : c10::cuda::current_device();
}
}  // namespace

CudaGraphStep::CudaGraphStep(const c10::Device& device) {
  const c10::DeviceIndex index = device_index(device);
  torch::cuda::synchronize(index);  // the side stream starts after everything queued so far
  impl_ = std::make_unique<Impl>(index);
}

CudaGraphStep::~CudaGraphStep() {
  // Work queued on the side stream finishes before the default stream is current again.
  try {
    impl_->stream.synchronize();
  } catch (...) {
  }
}

void CudaGraphStep::capture(const std::function<void()>& body) {
  if (impl_->captured) throw run_error("CUDA graph: the step is already captured");
  torch::cuda::synchronize(impl_->stream.device_index());
  // Autocast's cache of cast weights would outlive the capture holding memory of the graph's pool.
  const bool cache = at::autocast::is_autocast_cache_enabled();
  at::autocast::set_autocast_cache_enabled(false);
  std::string failure;
  try {
    impl_->graph.capture_begin();
    try {
      body();
    } catch (const std::exception& e) {
      failure = e.what();
    }
    impl_->graph.capture_end();  // also after a failure: a capture left open breaks every later CUDA call
  } catch (const std::exception& e) {
    if (failure.empty()) failure = e.what();
  }
  at::autocast::set_autocast_cache_enabled(cache);
  if (!failure.empty()) {
    const std::string first_line = failure.substr(0, failure.find('\n'));
    throw run_error("CUDA graph capture of the training step failed (" + first_line + "); train without --cuda-graph");
  }
  impl_->captured = true;
  // The eager warm-up steps' blocks sit cached in the allocator's general pool; the graph replays in its own
  // pool. Handing them back keeps the device memory a graphed run holds near one step's.
  torch::cuda::synchronize(impl_->stream.device_index());
  c10::cuda::CUDACachingAllocator::emptyCache();
}

bool CudaGraphStep::captured() const { return impl_->captured; }

void CudaGraphStep::replay() {
  if (!impl_->captured) throw run_error("CUDA graph: replay before capture");
  impl_->graph.replay();
}

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

#endif

}  // namespace diffuse
