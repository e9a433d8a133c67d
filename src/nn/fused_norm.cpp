// GroupNorm (+ SiLU) as one autograd function over the project's own kernels: on CUDA the kernels of
// src/nn/cuda/group_norm.cu (built with -DDIFFUSE_HAVE_CUDA_KERNELS), on the CPU the same block program run
// serially (group_norm_kernel.h), which the tests compare with LibTorch's GroupNorm.
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <atomic>
#include <string>

#include "diffuse/common.h"
#include "nn/blocks.h"
#include "nn/group_norm_kernel.h"

#if defined(DIFFUSE_HAVE_CUDA_KERNELS) && __has_include(<c10/cuda/CUDAStream.h>)
#define DIFFUSE_FUSED_NORM_CUDA 1
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "nn/cuda/group_norm_cuda.h"
#endif

namespace diffuse {
namespace nn_detail {
namespace {

using gn_kernel::Bf16;
using gn_kernel::Group;
using gn_kernel::Moments;
using gn_kernel::Shape;

std::atomic<bool> g_fused_norm{false};
std::atomic<int64_t> g_fused_norm_calls{0};
thread_local bool t_fused_norm_on_cpu = false;

Shape shape_of(const at::Tensor& x, int64_t groups) {
  return Shape{x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1)), groups};
}

// ---- the block program on the CPU: blocks in parallel, each block's threads one after another ----
template <class T>
void forward_serial(const T* x, const float* w, const float* b, T* y, float* stats, const Shape& s, float eps,
                    bool silu) {
  const int64_t threads = gn_kernel::block_threads(s);
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const Group g(s, block);
      float sum = 0.0f, s1 = 0.0f, s2 = 0.0f;
      for (int64_t t = 0; t < threads; ++t) sum += gn_kernel::forward_sum(g, x, t, threads);
      const float m0 = sum / static_cast<float>(g.d);
      for (int64_t t = 0; t < threads; ++t) {
        float a, b2;
        gn_kernel::forward_centred_sums(g, x, m0, t, threads, a, b2);
        s1 += a;
        s2 += b2;
      }
      const Moments m = gn_kernel::moments_from(m0, s1, s2, g.d, eps);
      m.write(stats, g.stats);
      for (int64_t t = 0; t < threads; ++t) gn_kernel::forward_write(g, x, w, b, m, silu, y, t, threads);
    }
  });
}

template <class T>
void backward_serial(const T* x, const T* dy, const float* w, const float* b, const float* stats, const Shape& s,
                     bool silu, T* dx, float* dw_part, float* db_part) {
  const int64_t threads = gn_kernel::block_threads(s);
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const Group g(s, block);
      const int64_t image = block / s.groups;
      const Moments m = Moments::read(stats, g.stats);
      float a = 0.0f, bx = 0.0f;
      for (int64_t k = 0; k < s.cg(); ++k) {
        float sum_ux = 0.0f, sum_u = 0.0f;
        for (int64_t t = 0; t < threads; ++t) {
          float ux, u;
          gn_kernel::backward_channel_sums(g, x, dy, w, b, m, silu, k, t, threads, ux, u);
          sum_ux += ux;
          sum_u += u;
        }
        const int64_t c = g.c0 + k;
        dw_part[image * s.c + c] = sum_ux;
        db_part[image * s.c + c] = sum_u;
        bx += w[c] * sum_ux;
        a += w[c] * sum_u;
      }
      const float d = static_cast<float>(g.d);
      for (int64_t t = 0; t < threads; ++t) {
        gn_kernel::backward_write(g, x, dy, w, b, m, silu, a / d, bx / d, dx, t, threads);
      }
    }
  });
}

template <class T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

#ifdef DIFFUSE_FUSED_NORM_CUDA
void check_launch(const char* error, const char* what) {
  if (error != nullptr) throw run_error(std::string("fused GroupNorm: the CUDA ") + what + " kernel failed: " + error);
}
#endif

void run_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& y,
                 const at::Tensor& stats, int64_t groups, double eps, bool silu) {
  const Shape s = shape_of(x, groups);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (x.is_cuda()) {
#ifdef DIFFUSE_FUSED_NORM_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(gn_cuda::forward(bf16, x.data_ptr(), ptr<float>(w), ptr<float>(b), y.data_ptr(), ptr<float>(stats), s,
                                  static_cast<float>(eps), silu,
                                  c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
                 "forward");
    return;
#else
    throw input_error("fused GroupNorm: this build has no CUDA kernels (-DDIFFUSE_CUDA_KERNELS=ON with nvcc)");
#endif
  }
  if (bf16) {
    forward_serial(ptr<Bf16>(x), ptr<float>(w), ptr<float>(b), ptr<Bf16>(y), ptr<float>(stats), s,
                   static_cast<float>(eps), silu);
  } else {
    forward_serial(ptr<float>(x), ptr<float>(w), ptr<float>(b), ptr<float>(y), ptr<float>(stats), s,
                   static_cast<float>(eps), silu);
  }
}

void run_backward(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& b,
                  const at::Tensor& stats, int64_t groups, bool silu, const at::Tensor& dx, const at::Tensor& dw_part,
                  const at::Tensor& db_part) {
  const Shape s = shape_of(x, groups);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (x.is_cuda()) {
#ifdef DIFFUSE_FUSED_NORM_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(gn_cuda::backward(bf16, x.data_ptr(), dy.data_ptr(), ptr<float>(w), ptr<float>(b), ptr<float>(stats),
                                   s, silu, dx.data_ptr(), ptr<float>(dw_part), ptr<float>(db_part),
                                   c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
                 "backward");
    return;
#else
    throw input_error("fused GroupNorm: this build has no CUDA kernels (-DDIFFUSE_CUDA_KERNELS=ON with nvcc)");
#endif
  }
  if (bf16) {
    backward_serial(ptr<Bf16>(x), ptr<Bf16>(dy), ptr<float>(w), ptr<float>(b), ptr<float>(stats), s, silu,
                    ptr<Bf16>(dx), ptr<float>(dw_part), ptr<float>(db_part));
  } else {
    backward_serial(ptr<float>(x), ptr<float>(dy), ptr<float>(w), ptr<float>(b), ptr<float>(stats), s, silu,
                    ptr<float>(dx), ptr<float>(dw_part), ptr<float>(db_part));
  }
}

// x: contiguous [N, C, ...] float32 or bfloat16; weight, bias: contiguous float32 [C]. Keeps x and the moments.
struct FusedGroupNormFn : public torch::autograd::Function<FusedGroupNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t groups, double eps, bool silu) {
    const at::TensorOptions f32 = x.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    at::Tensor stats = at::empty({x.size(0), groups, 3}, f32);  // gn_kernel::Moments
    run_forward(x, weight, bias, y, stats, groups, eps, silu);
    ctx->save_for_backward({x, weight, bias, stats});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &stats = saved[3];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const at::Tensor dy = grads[0].to(x.scalar_type()).contiguous();
    const at::TensorOptions f32 = x.options().dtype(at::kFloat);
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    at::Tensor dw_part = at::empty({x.size(0), x.size(1)}, f32), db_part = at::empty({x.size(0), x.size(1)}, f32);
    run_backward(x, dy, weight, bias, stats, groups, ctx->saved_data["silu"].toBool(), dx, dw_part, db_part);
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), ctx->needs_input_grad(1) ? dw_part.sum(0) : at::Tensor(),
            ctx->needs_input_grad(2) ? db_part.sum(0) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool fused_group_norm_applies(const at::Tensor& x) {
  return x.dim() >= 2 && x.numel() > 0 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
         x.is_contiguous() && (x.is_cpu() || (x.is_cuda() && fused_norm_built()));
}

at::Tensor fused_group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                            double eps, bool silu) {
  if (x.dim() < 2 || groups <= 0 || x.size(1) % groups != 0 || x.numel() == 0) {
    throw input_error("fused GroupNorm: expected a non-empty [N, C, ...] with C divisible by " +
                      std::to_string(groups) + " groups, got " + shape_str(x.sizes()));
  }
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) {
    throw input_error(std::string("fused GroupNorm: float32 or bfloat16 input, got ") + c10::toString(x.scalar_type()));
  }
  const int64_t c = x.size(1);
  for (const at::Tensor* p : {&weight, &bias}) {
    if (p->defined() && (p->dim() != 1 || p->size(0) != c)) {
      throw input_error("fused GroupNorm: weight and bias must be [" + std::to_string(c) + "], got " +
                        shape_str(p->sizes()));
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
  ++g_fused_norm_calls;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  return FusedGroupNormFn::apply(x.contiguous(), weight.defined() ? weight.to(at::kFloat).contiguous() : at::ones({c}, f32),
                                 bias.defined() ? bias.to(at::kFloat).contiguous() : at::zeros({c}, f32), groups, eps,
                                 silu);
}

int64_t fused_group_norm_calls() { return g_fused_norm_calls; }
FusedNormOnCpuForTests::FusedNormOnCpuForTests() : before_(t_fused_norm_on_cpu) { t_fused_norm_on_cpu = true; }
FusedNormOnCpuForTests::~FusedNormOnCpuForTests() { t_fused_norm_on_cpu = before_; }
bool fused_norm_on_cpu_for_tests() { return t_fused_norm_on_cpu; }

}  // namespace nn_detail

void set_fused_norm(bool on) { nn_detail::g_fused_norm = on; }
bool fused_norm() { return nn_detail::g_fused_norm; }
bool fused_norm_built() {
#ifdef DIFFUSE_FUSED_NORM_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace diffuse
