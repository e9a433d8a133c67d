// A training step captured once as a CUDA graph and replayed: one launch per step instead of the ~1,500
// kernel launches of a U-Net's forward, backward and optimizer step, so that the step is bound by the GPU
// and not by the host dispatching it.
//
//   diffuse::CudaGraphStep graph(device);   // from here on, work runs on a side stream
//   ...eager warm-up steps...
//   graph.capture(body);                    // records body (reading fixed input buffers), runs nothing
//   for (...) { fill the input buffers; graph.replay(); }
//
// body must not wait for the GPU or read host data: every per-step number it needs lives in a device buffer
// that the caller refills before each replay. Random kernels (dropout) draw from the default CUDA
// generator, whose seed and offset are read at each replay.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <memory>

namespace diffuse {

// Whether this build links a CUDA LibTorch (CUDA graphs can be captured).
bool cuda_graphs_built();

class CudaGraphStep {
 public:
  // Synchronizes the device and makes a side stream current until destruction (capture needs a stream
  // other than the default one, and PyTorch wants the warm-up iterations on that same stream).
  explicit CudaGraphStep(const c10::Device& device);
  ~CudaGraphStep();
  CudaGraphStep(const CudaGraphStep&) = delete;
  CudaGraphStep& operator=(const CudaGraphStep&) = delete;

  // Records body without running it; a failure ends the capture and throws run_error.
  void capture(const std::function<void()>& body);
  bool captured() const;
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A function of device tensors f(x, c, labels) (labels may be undefined), captured as a CUDA graph once per shape
// of its inputs after `warmup` eager calls of that shape, and replayed from then on: for sampling, where a network
// evaluation becomes one launch instead of ~500. While it lives, its work and its callers' run on a side stream
// (as CudaGraphStep). Each call copies the inputs into the graph's fixed buffers and returns a copy of its output.
// f must not wait for the GPU or read host data, and must compute from its arguments alone (no randomness).
// Every shape keeps its own graph and memory pool.
class CudaGraphFunction {
 public:
  using Fn = std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>;
  CudaGraphFunction(Fn fn, const c10::Device& device, int64_t warmup = 1);
  ~CudaGraphFunction();
  CudaGraphFunction(const CudaGraphFunction&) = delete;
  CudaGraphFunction& operator=(const CudaGraphFunction&) = delete;

  at::Tensor operator()(const at::Tensor& x, const at::Tensor& c, const at::Tensor& labels);
  int64_t graphs() const;   // shapes captured so far
  int64_t replays() const;  // calls answered by a replay

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffuse
