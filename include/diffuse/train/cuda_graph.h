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

}  // namespace diffuse
