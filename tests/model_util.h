// A small untrained model for tests of the model-level features (the tiny preset's U-Net, seed 0).
#pragma once

#include <torch/torch.h>

#include "diffuse/config.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/process.h"

namespace diffuse_test {

// channels: image channels; conditional: 10 classes plus the null class of label dropout (p_uncond 0.1).
inline diffuse::Model untrained_model(int64_t channels, bool conditional) {
  diffuse::Model m;
  m.config = diffuse::load_preset("tiny");
  m.config.model.in_channels = channels;
  m.config.model.out_channels = channels;
  if (conditional) {
    m.config.model.num_class_embeds = 11;
    m.config.train.class_conditional = true;
    m.config.train.p_uncond = 0.1;
  }
  torch::manual_seed(0);
  m.net = diffuse::UNet2DModel(m.config.model);
  m.net->eval();
  m.process = std::shared_ptr<diffuse::Process>(diffuse::make_process(m.config.process).release());
  return m;
}

}  // namespace diffuse_test
