#include "diffuse/version.h"

#include <torch/version.h>

#include "diffuse/nn/unet.h"
#include "diffuse/train/cuda_graph.h"
#include "diffuse/train/distributed.h"

namespace diffuse {

const char* version() { return "0.1.0"; }

std::string build_description() {
  auto yes = [](bool b) { return b ? "yes" : "no"; };
  return std::string("diffuse ") + version() + " (LibTorch " + TORCH_VERSION + "; CPU Winograd: " +
         (cpu_winograd_built() ? "oneDNN 2 + own" : "own") + ", c10d: " + yes(distributed_available()) +
         ", CUDA graphs: " + yes(cuda_graphs_built()) + ", fused CUDA kernels: " + yes(fused_norm_built()) + ")";
}

}  // namespace diffuse
