// Mixed precision: the network's convolutions and matrix products in bfloat16 (or float16 on CUDA) while
// parameters, optimizer state, losses and the sampler's arithmetic stay float32 (autocast, as
// torch.autocast does it). Off by default: float32 is the reference; bf16 roughly halves the cost of a
// convolution on CPUs with AVX512-BF16/AMX and on GPUs.
//
//   diffuse::Precision p = diffuse::parse_precision("bf16");      // "fp32" | "bf16" | "fp16"
//   { diffuse::AutocastGuard guard(device, p); out = net->forward(x, t); }   // out is float32 again
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <string>

namespace diffuse {

enum class Precision { kFloat32, kBFloat16, kFloat16 };

// "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16"; anything else: input_error naming the choices.
Precision parse_precision(const std::string& name);
std::string precision_name(Precision p);
// Throws input_error when the device cannot run the precision (float16 autocast on a CPU).
void check_precision(Precision p, const c10::Device& device);
// Whether LibTorch's CPU bfloat16 convolutions and products sum in float32 on this CPU: they go through
// oneDNN where the CPU has AVX-512 (BW, VL, DQ). Elsewhere LibTorch falls back to kernels that sum in
// bfloat16: on an AVX2 CPU, 4-7% relative error against float32 (against ~1% through oneDNN) and a 3x3
// convolution 14x slower than in float32. `--precision bf16` on such a CPU warns and carries on.
bool cpu_bf16_sums_in_float32();

// Whether autocast is on for the device's type, and the dtype it casts to (LibTorch 1.x and 2.x alike).
bool autocast_active(const c10::Device& device);
c10::ScalarType autocast_target(const c10::Device& device);

// Enables autocast to the precision's dtype on the device's type for its lifetime; restores the previous
// state (and clears autocast's weight-cast cache) on exit. A no-op for kFloat32.
class AutocastGuard {
 public:
  AutocastGuard(const c10::Device& device, Precision p);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false;
  bool cuda_ = false;
  bool prev_enabled_ = false;
  c10::ScalarType prev_dtype_ = c10::ScalarType::Float;
};

}  // namespace diffuse
