#include "diffuse/nn/precision.h"

#include <ATen/autocast_mode.h>

#include <atomic>
#include <cstdio>

#include "diffuse/common.h"

namespace diffuse {

Precision parse_precision(const std::string& name) {
  if (name == "fp32" || name == "float32") return Precision::kFloat32;
  if (name == "bf16" || name == "bfloat16") return Precision::kBFloat16;
  if (name == "fp16" || name == "float16") return Precision::kFloat16;
  throw input_error("unknown precision '" + name + "' (choose fp32, bf16 or fp16)");
}

std::string precision_name(Precision p) {
  switch (p) {
    case Precision::kBFloat16: return "bf16";
    case Precision::kFloat16: return "fp16";
    default: return "fp32";
  }
}

bool cpu_bf16_sums_in_float32() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

void check_precision(Precision p, const c10::Device& device) {
  if (p == Precision::kFloat16 && !device.is_cuda()) {
    throw input_error("fp16 mixed precision needs a CUDA device; use bf16 on the CPU");
  }
  static std::atomic<bool> warned{false};
  if (p == Precision::kBFloat16 && device.is_cpu() && !cpu_bf16_sums_in_float32() && !warned.exchange(true)) {
    std::fprintf(stderr,
                 "warning: this CPU has no AVX-512: LibTorch computes bf16 convolutions here with bf16 sums, "
                 "slower and less exact than fp32 (--precision fp32)\n");
  }
}

namespace {

// LibTorch 2.4 replaced the per-device setters with ones taking the device type.
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4))
bool autocast_enabled(bool cuda) { return at::autocast::is_autocast_enabled(cuda ? at::kCUDA : at::kCPU); }
void set_autocast_enabled(bool cuda, bool on) { at::autocast::set_autocast_enabled(cuda ? at::kCUDA : at::kCPU, on); }
c10::ScalarType autocast_dtype(bool cuda) { return at::autocast::get_autocast_dtype(cuda ? at::kCUDA : at::kCPU); }
void set_autocast_dtype(bool cuda, c10::ScalarType t) { at::autocast::set_autocast_dtype(cuda ? at::kCUDA : at::kCPU, t); }
#else
bool autocast_enabled(bool cuda) { return cuda ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled(); }
void set_autocast_enabled(bool cuda, bool on) {
  if (cuda) {
    at::autocast::set_enabled(on);
  } else {
    at::autocast::set_cpu_enabled(on);
  }
}
c10::ScalarType autocast_dtype(bool cuda) {
  return cuda ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
}
void set_autocast_dtype(bool cuda, c10::ScalarType t) {
  if (cuda) {
    at::autocast::set_autocast_gpu_dtype(t);
  } else {
    at::autocast::set_autocast_cpu_dtype(t);
  }
}
#endif

}  // namespace

bool autocast_active(const c10::Device& device) { return autocast_enabled(device.is_cuda()); }
c10::ScalarType autocast_target(const c10::Device& device) { return autocast_dtype(device.is_cuda()); }

AutocastGuard::AutocastGuard(const c10::Device& device, Precision p) {
  if (p == Precision::kFloat32) return;
  check_precision(p, device);
  active_ = true;
  cuda_ = device.is_cuda();
  prev_enabled_ = autocast_enabled(cuda_);
  prev_dtype_ = autocast_dtype(cuda_);
  set_autocast_dtype(cuda_, p == Precision::kBFloat16 ? at::kBFloat16 : at::kHalf);
  set_autocast_enabled(cuda_, true);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  set_autocast_enabled(cuda_, prev_enabled_);
  set_autocast_dtype(cuda_, prev_dtype_);
}

}  // namespace diffuse
