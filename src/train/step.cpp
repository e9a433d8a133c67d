#include "diffuse/train/step.h"

#include "diffuse/common.h"
#include "diffuse/edit.h"
#include "diffuse/train/cuda_graph.h"
#include "diffuse/train/distributed.h"

namespace diffuse {

TrainStep::TrainStep(TrainStepParts parts, const at::Device& device, bool cuda_graph)
    : p_(std::move(parts)), device_(device) {
  if (!p_.net || !p_.flat || !p_.opt || !p_.process) throw run_error("TrainStep: network, parameters, optimizer and process are required");
  nonfinite_ = at::zeros({}, at::TensorOptions().device(device).dtype(at::kBool));
  if (cuda_graph) {
    if (p_.reducer) throw input_error("--cuda-graph is for one process; data-parallel steps run eagerly");
    graph_ = std::make_unique<CudaGraphStep>(device);
  }
}

TrainStep::~TrainStep() = default;

bool TrainStep::graph_captured() const { return graph_ && graph_->captured(); }

at::Tensor TrainStep::device_step(const Inputs& in) {
  UNet2DModel net = p_.net;
  ModelFn model = [net](const at::Tensor& x, const at::Tensor& c, const at::Tensor& l) mutable { return net->forward(x, c, l); };
  if (p_.sr_factor > 0) {
    // SR3: the network sees the low-resolution version of its target beside the noisy image.
    model = conditioned_model_fn(p_.net, sr_condition(downsample(in.x0, p_.sr_factor), p_.sr_factor));
  }
  LossOutput out = evaluate_loss(model, *p_.process, p_.loss, in.x0, in.labels, in.table, in.eps);
  if (p_.reducer) p_.reducer->prepare();
  out.loss.backward();
  if (p_.reducer) p_.reducer->finish();  // the gradient is the mean over all ranks' images
  p_.flat->gather_grad();                // transient storage: into one buffer, now that activations are freed
  grad_norm_ = p_.flat->clip_grad_norm(p_.grad_clip);
  const at::Tensor loss = out.loss.detach();
  nonfinite_.logical_or_(loss.isinf().logical_or(loss.isnan()));
  p_.opt->apply(in.scalars);
  p_.flat->zero_grad();
  if (p_.ema) p_.ema->update(p_.flat->data(), in.scalars[3]);
  return loss;
}

at::Tensor TrainStep::run(const at::Tensor& x0, const at::Tensor& labels, const LossDraw& draw, double lr,
                          double ema_decay) {
  // This step's host numbers travel like the draws: one small tensor, no waiting.
  const at::Tensor scalars = at::cat({p_.opt->next_scalars(lr), at::full({1}, 1.0 - ema_decay, at::kFloat)});
  if (graph_ && graph_->captured()) {
    statics_.x0.copy_(x0);
    if (labels.defined()) statics_.labels.copy_(labels);
    upload_into(statics_.table, draw.table);
    upload_into(statics_.eps, draw.eps);
    upload_into(statics_.scalars, scalars);
    graph_->replay();
    return graph_loss_;
  }
  Inputs in{x0, labels, upload(draw.table, device_, x0.scalar_type()), upload(draw.eps, device_, x0.scalar_type()),
            upload(scalars, device_)};
  if (graph_ && eager_steps_ >= kGraphWarmupSteps) {
    // The buffers the graph reads, filled anew before every replay; this step's inputs are already in them.
    statics_ = in;
    statics_.x0 = x0.clone();
    if (labels.defined()) statics_.labels = labels.clone();
    graph_->capture([&] { graph_loss_ = device_step(statics_); });
    graph_->replay();
    return graph_loss_;
  }
  ++eager_steps_;
  return device_step(in);
}

}  // namespace diffuse
