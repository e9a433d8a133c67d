// One training step on the device, shared by the trainer and bench_train_speed: the loss from inputs drawn on
// the host (diffuse::draw_loss_inputs), backward, the gradient all-reduce when data-parallel, global norm
// clipping, AdamW over the flat buffer and the EMA. With a CUDA graph it runs eagerly for a few warm-up
// steps, is then captured once and replayed: one launch per step.
//
//   diffuse::TrainStep step(parts, device, /*cuda_graph=*/true);
//   at::Tensor loss = step.run(x0, labels, draw_loss_inputs(...), lr, ema_decay);   // 0-dim, on the device
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "diffuse/loss.h"
#include "diffuse/nn/unet.h"
#include "diffuse/process.h"
#include "diffuse/train/optim.h"

namespace diffuse {

class CudaGraphStep;
class GradReducer;

struct TrainStepParts {
  UNet2DModel net{nullptr};
  FlatParameters* flat = nullptr;
  AdamW* opt = nullptr;
  Ema* ema = nullptr;              // null: no EMA here (data-parallel ranks other than 0)
  GradReducer* reducer = nullptr;  // data-parallel: the mean gradient over ranks
  const Process* process = nullptr;
  LossConfig loss;
  double grad_clip = 0.0;
  int64_t sr_factor = 0;           // > 0: SR3, the network also sees the low-resolution x0
};

class TrainStep {
 public:
  static constexpr int64_t kGraphWarmupSteps = 3;  // eager steps before the capture (lazy setup, cuDNN's search)

  TrainStep(TrainStepParts parts, const at::Device& device, bool cuda_graph);
  ~TrainStep();

  // One step. x0 and labels on the device, the draw from draw_loss_inputs, lr and the EMA decay of this step.
  // Counts the optimizer step. Returns the loss (0-dim, on the device; with a graph, a buffer that the next
  // step overwrites).
  at::Tensor run(const at::Tensor& x0, const at::Tensor& labels, const LossDraw& draw, double lr, double ema_decay);

  const at::Tensor& grad_norm() const { return grad_norm_; }  // of the last step, before clipping
  const at::Tensor& nonfinite() const { return nonfinite_; }  // whether any loss so far was inf or NaN
  bool graph_captured() const;

 private:
  // Everything a step reads: the batch, the drawn loss inputs, and {1 - lr wd, sqrt(bc2), -lr / bc1, 1 - decay}.
  struct Inputs {
    at::Tensor x0, labels, table, eps, scalars;
  };
  at::Tensor device_step(const Inputs& in);  // no host data, no waiting: what the graph records

  TrainStepParts p_;
  at::Device device_;
  std::unique_ptr<CudaGraphStep> graph_;
  int64_t eager_steps_ = 0;
  Inputs statics_;  // the graph's inputs, refilled before every replay
  at::Tensor graph_loss_;
  at::Tensor grad_norm_;
  at::Tensor nonfinite_;
};

}  // namespace diffuse
