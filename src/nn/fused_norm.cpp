// GroupNorm (+ SiLU) as one autograd function over the project's own kernels, for NCHW and NHWC memory: on
// CUDA the kernels of src/nn/cuda/group_norm.cu (built with -DDIFFUSE_HAVE_CUDA_KERNELS), on the CPU the same
// block programs run serially (group_norm_kernel.h), which the tests compare with LibTorch's GroupNorm.
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
using gn_kernel::Source;

std::atomic<bool> g_fused_norm{false};
std::atomic<int64_t> g_fused_norm_calls{0};
thread_local bool t_fused_norm_on_cpu = false;

// With an addend: its row stride too (fused_group_norm hands the kernels rows of contiguous channels).
Shape shape_of(const at::Tensor& x, int64_t groups, const at::Tensor& addend) {
  Shape s{x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1)), groups};
  s.addend_row = addend.defined() && addend.numel() > 0 ? addend.stride(0) : s.c;
  return s;
}

// ---- the block program on the CPU: blocks in parallel, each block's threads one after another ----
template <class T>
void forward_serial(const Source<T>& src, const float* w, const float* b, T* y, float* stats, float eps, bool silu) {
  const Shape& s = src.shape;
  const int64_t threads = gn_kernel::block_threads(s);
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const Group g(s, block);
      float sum = 0.0f, s1 = 0.0f, s2 = 0.0f;
      for (int64_t t = 0; t < threads; ++t) sum += gn_kernel::forward_sum(g, src, t, threads);
      const float m0 = sum / static_cast<float>(g.d);
      for (int64_t t = 0; t < threads; ++t) {
        float a, b2;
        gn_kernel::forward_centred_sums(g, src, m0, t, threads, a, b2);
        s1 += a;
        s2 += b2;
      }
      const Moments m = gn_kernel::moments_from(m0, s1, s2, g.d, eps);
      m.write(stats, g.stats);
      for (int64_t t = 0; t < threads; ++t) gn_kernel::forward_write(g, src, w, b, m, silu, y, t, threads);
    }
  });
}

template <class T>
void backward_serial(const Source<T>& src, const T* dy, const float* w, const float* b, const float* stats, bool silu,
                     T* dx, float* dw_part, float* db_part, float* d_addend) {
  const Shape& s = src.shape;
  const int64_t threads = gn_kernel::block_threads(s);
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const Group g(s, block);
      const Moments m = Moments::read(stats, g.stats);
      float a = 0.0f, bx = 0.0f;
      for (int64_t k = 0; k < s.cg(); ++k) {
        float sum_ux = 0.0f, sum_u = 0.0f, sum_x = 0.0f;
        for (int64_t t = 0; t < threads; ++t) {
          float ux, u, xs;
          gn_kernel::backward_channel_sums(g, src, dy, w, b, m, silu, k, t, threads, ux, u, xs);
          sum_ux += ux;
          sum_u += u;
          sum_x += xs;
        }
        const int64_t c = g.c0 + k, nc = g.per_channel(s, k);
        dw_part[nc] = sum_ux;
        db_part[nc] = sum_u;
        if (d_addend) d_addend[nc] = sum_x;  // until a and bx are known
        bx += w[c] * sum_ux;
        a += w[c] * sum_u;
      }
      const float d = static_cast<float>(g.d);
      if (d_addend) {
        for (int64_t k = 0; k < s.cg(); ++k) {
          const int64_t nc = g.per_channel(s, k);
          d_addend[nc] =
              gn_kernel::addend_gradient(g.hw, m, w[g.c0 + k], db_part[nc], d_addend[nc], a / d, bx / d);
        }
      }
      for (int64_t t = 0; t < threads; ++t) {
        gn_kernel::backward_write(g, src, dy, w, b, m, silu, a / d, bx / d, dx, t, threads);
      }
    }
  });
}

// The channels-last block program (gn_kernel::NhwcTile) on the CPU: each phase runs the block's threads one
// after another, then the phase's reductions as the CUDA kernels run them between their barriers.
template <class T>
void nhwc_forward_serial(const Source<T>& src, const float* w, const float* b, T* y, float* stats, float eps,
                         bool silu) {
  const Shape& s = src.shape;
  const gn_kernel::NhwcTile tile = gn_kernel::nhwc_tile(s);
  const int64_t threads = tile.threads(), width = tile.width, cg = s.cg();
  const float d = static_cast<float>(cg * s.hw);
  at::parallel_for(0, tile.blocks(s), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vals(static_cast<size_t>(2 * threads)), cols(static_cast<size_t>(2 * width));
    std::vector<float> m0s(static_cast<size_t>(tile.per_block));
    std::vector<Moments> moms(static_cast<size_t>(tile.per_block));
    std::vector<gn_kernel::NhwcThread> th;
    for (int64_t block = begin; block < end; ++block) {
      th.clear();
      for (int64_t t = 0; t < threads; ++t) th.emplace_back(s, tile, block, t);
      for (int64_t t = 0; t < threads; ++t) vals[t] = gn_kernel::nhwc_forward_sum(src, tile, th[t]);
      for (int64_t t = 0; t < width; ++t) cols[t] = gn_kernel::column_sum(vals.data(), tile, t);
      for (int64_t j = 0; j < tile.per_block; ++j) m0s[j] = gn_kernel::group_sum(cols.data(), cg, j) / d;
      for (int64_t t = 0; t < threads; ++t) {
        gn_kernel::nhwc_forward_centred_sums(src, tile, th[t], m0s[th[t].group_in_block(s)], vals[t],
                                             vals[threads + t]);
      }
      for (int64_t t = 0; t < width; ++t) {
        cols[t] = gn_kernel::column_sum(vals.data(), tile, t);
        cols[width + t] = gn_kernel::column_sum(vals.data() + threads, tile, t);
      }
      for (int64_t j = 0; j < tile.per_block; ++j) {
        moms[j] = gn_kernel::moments_from(m0s[j], gn_kernel::group_sum(cols.data(), cg, j),
                                          gn_kernel::group_sum(cols.data() + width, cg, j), cg * s.hw, eps);
        moms[j].write(stats, th[0].stats + j);
      }
      for (int64_t t = 0; t < threads; ++t) {
        gn_kernel::nhwc_forward_write(src, tile, th[t], w, b, moms[th[t].group_in_block(s)], silu, y);
      }
    }
  });
}

template <class T>
void nhwc_backward_serial(const Source<T>& src, const T* dy, const float* w, const float* b,
                          const float* stats, bool silu, T* dx, float* dw_part, float* db_part,
                          float* d_addend) {
  const Shape& s = src.shape;
  const gn_kernel::NhwcTile tile = gn_kernel::nhwc_tile(s);
  const int64_t threads = tile.threads(), width = tile.width, cg = s.cg();
  const float d = static_cast<float>(cg * s.hw);
  at::parallel_for(0, tile.blocks(s), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vals(static_cast<size_t>(3 * threads)), cols(static_cast<size_t>(3 * width));
    std::vector<float> ab(static_cast<size_t>(2 * tile.per_block));
    std::vector<gn_kernel::NhwcThread> th;
    std::vector<Moments> moms;
    for (int64_t block = begin; block < end; ++block) {
      th.clear();
      moms.clear();
      for (int64_t t = 0; t < threads; ++t) {
        th.emplace_back(s, tile, block, t);
        moms.push_back(Moments::read(stats, th[t].stats));
      }
      for (int64_t t = 0; t < threads; ++t) {
        gn_kernel::nhwc_backward_sums(src, tile, th[t], dy, w, b, moms[t], silu, vals[t], vals[threads + t],
                                      vals[2 * threads + t]);
      }
      for (int64_t t = 0; t < width; ++t) {
        for (int64_t q = 0; q < 3; ++q)
          cols[q * width + t] = gn_kernel::column_sum(vals.data() + q * threads, tile, t);
        dw_part[th[t].per_channel(s)] = cols[t];
        db_part[th[t].per_channel(s)] = cols[width + t];
      }
      const float* wb = w + th[0].c;  // the block's first channel's weight
      for (int64_t j = 0; j < tile.per_block; ++j) {
        ab[2 * j] = gn_kernel::group_sum(cols.data() + width, cg, j, wb) / d;
        ab[2 * j + 1] = gn_kernel::group_sum(cols.data(), cg, j, wb) / d;
      }
      for (int64_t t = 0; t < width && d_addend; ++t) {
        const int64_t j = th[t].group_in_block(s);
        d_addend[th[t].per_channel(s)] = gn_kernel::addend_gradient(
            s.hw, moms[t], w[th[t].c], cols[width + t], cols[2 * width + t], ab[2 * j], ab[2 * j + 1]);
      }
      for (int64_t t = 0; t < threads; ++t) {
        const int64_t j = th[t].group_in_block(s);
        gn_kernel::nhwc_backward_write(src, tile, th[t], dy, w, b, moms[t], silu, ab[2 * j], ab[2 * j + 1],
                                       dx);
      }
    }
  });
}

template <class T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// The CPU block program in x's element type: f(T{}) with T float or Bf16.
template <class F>
void in_element_type(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kBFloat16) {
    f(Bf16{});
  } else {
    f(float{});
  }
}

#ifdef DIFFUSE_FUSED_NORM_CUDA
// For one launch: x's device made current, and that device's current stream.
struct CudaLaunch {
  explicit CudaLaunch(const at::Tensor& x)
      : guard(x.device()), stream(c10::cuda::getCurrentCUDAStream(x.device().index()).stream()) {}
  c10::cuda::CUDAGuard guard;
  void* stream;
};
void check_launch(const char* error, const char* what) {
  if (error != nullptr) throw run_error(std::string("fused GroupNorm: the CUDA ") + what + " kernel failed: " + error);
}
#else
[[noreturn]] void no_cuda_kernels() {
  throw input_error("fused GroupNorm: this build has no CUDA kernels (-DDIFFUSE_CUDA_KERNELS=ON with nvcc)");
}
#endif

// An empty tensor stands for "none" (LibTorch 1.x's autograd functions take no undefined inputs).
template <class T>
T* maybe_ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? ptr<T>(t) : nullptr;
}

void run_forward(const at::Tensor& x, const at::Tensor& addend, const at::Tensor& w, const at::Tensor& b,
                 const at::Tensor& y, const at::Tensor& stats, int64_t groups, double eps, bool silu,
                 bool nhwc) {
  const Shape s = shape_of(x, groups, addend);
  const float e = static_cast<float>(eps);
  if (x.is_cuda()) {
#ifdef DIFFUSE_FUSED_NORM_CUDA
    const CudaLaunch launch(x);
    check_launch((nhwc ? gn_cuda::forward_nhwc : gn_cuda::forward)(
                     x.scalar_type() == at::kBFloat16, x.data_ptr(), maybe_ptr<float>(addend), ptr<float>(w),
                     ptr<float>(b), y.data_ptr(), ptr<float>(stats), s, e, silu, launch.stream),
                 "forward");
    return;
#else
    no_cuda_kernels();
#endif
  }
  in_element_type(x, [&](auto type) {
    using T = decltype(type);
    const Source<T> src{ptr<T>(x), maybe_ptr<float>(addend), s};
    if (nhwc) {
      nhwc_forward_serial(src, ptr<float>(w), ptr<float>(b), ptr<T>(y), ptr<float>(stats), e, silu);
    } else {
      forward_serial(src, ptr<float>(w), ptr<float>(b), ptr<T>(y), ptr<float>(stats), e, silu);
    }
  });
}

void run_backward(const at::Tensor& x, const at::Tensor& addend, const at::Tensor& dy, const at::Tensor& w,
                  const at::Tensor& b, const at::Tensor& stats, int64_t groups, bool silu, bool nhwc,
                  const at::Tensor& dx, const at::Tensor& dw_part, const at::Tensor& db_part,
                  const at::Tensor& d_addend) {
  const Shape s = shape_of(x, groups, addend);
  if (x.is_cuda()) {
#ifdef DIFFUSE_FUSED_NORM_CUDA
    const CudaLaunch launch(x);
    check_launch((nhwc ? gn_cuda::backward_nhwc : gn_cuda::backward)(
                     x.scalar_type() == at::kBFloat16, x.data_ptr(), maybe_ptr<float>(addend), dy.data_ptr(),
                     ptr<float>(w), ptr<float>(b), ptr<float>(stats), s, silu, dx.data_ptr(),
                     ptr<float>(dw_part), ptr<float>(db_part), maybe_ptr<float>(d_addend), launch.stream),
                 "backward");
    return;
#else
    no_cuda_kernels();
#endif
  }
  in_element_type(x, [&](auto type) {
    using T = decltype(type);
    const Source<T> src{ptr<T>(x), maybe_ptr<float>(addend), s};
    if (nhwc) {
      nhwc_backward_serial(src, ptr<T>(dy), ptr<float>(w), ptr<float>(b), ptr<float>(stats), silu, ptr<T>(dx),
                           ptr<float>(dw_part), ptr<float>(db_part), maybe_ptr<float>(d_addend));
    } else {
      backward_serial(src, ptr<T>(dy), ptr<float>(w), ptr<float>(b), ptr<float>(stats), silu, ptr<T>(dx),
                      ptr<float>(dw_part), ptr<float>(db_part), maybe_ptr<float>(d_addend));
    }
  });
}

// Whether x [N, C, H, W] lies in NHWC memory (channels-last contiguous, and not also NCHW contiguous, as with
// one channel or one pixel): the kernels' channels-last block program then takes it as it is.
bool nhwc_memory(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}
at::MemoryFormat memory_format(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x: contiguous [N, C, ...] or NHWC [N, C, H, W], float32 or bfloat16; addend: contiguous float32 [N, C] or
// empty; weight, bias: contiguous float32 [C]. Keeps x, the addend and the moments. y, dx take x's layout.
struct FusedGroupNormFn : public torch::autograd::Function<FusedGroupNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& addend,
                            const at::Tensor& weight, const at::Tensor& bias, int64_t groups, double eps, bool silu) {
    const bool nhwc = nhwc_memory(x);
    const at::TensorOptions f32 = x.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(x, memory_format(nhwc));
    at::Tensor stats = at::empty({x.size(0), groups, 3}, f32);  // gn_kernel::Moments
    run_forward(x, addend, weight, bias, y, stats, groups, eps, silu, nhwc);
    ctx->save_for_backward({x, addend, weight, bias, stats});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["nhwc"] = nhwc;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &addend = saved[1], &weight = saved[2], &bias = saved[3], &stats = saved[4];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool nhwc = ctx->saved_data["nhwc"].toBool();
    const at::Tensor dy = grads[0].to(x.scalar_type()).contiguous(memory_format(nhwc));
    const at::TensorOptions f32 = x.options().dtype(at::kFloat);
    const std::vector<int64_t> nc{x.size(0), x.size(1)};
    at::Tensor dx = at::empty_like(x, memory_format(nhwc));
    // The affine parameters' gradients per image, weight's and bias's in one buffer [2, N, C], summed over
    // the images by one reduction kernel instead of two.
    const at::Tensor parts = at::empty({2, x.size(0), x.size(1)}, f32);
    const at::Tensor dw_part = parts[0], db_part = parts[1];
    at::Tensor d_addend = addend.numel() > 0 ? at::empty(nc, f32) : at::Tensor();
    run_backward(x, addend, dy, weight, bias, stats, groups, ctx->saved_data["silu"].toBool(), nhwc, dx,
                 dw_part, db_part, d_addend);
    const bool want_w = ctx->needs_input_grad(2), want_b = ctx->needs_input_grad(3);
    const at::Tensor sums = want_w && want_b ? parts.sum(1) : at::Tensor();
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(),
            addend.numel() > 0 && ctx->needs_input_grad(1) ? d_addend : at::Tensor(),
            want_w ? (want_b ? sums[0] : dw_part.sum(0)) : at::Tensor(),
            want_b ? (want_w ? sums[1] : db_part.sum(0)) : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

bool fused_group_norm_applies(const at::Tensor& x) {
  return x.dim() >= 2 && x.numel() > 0 &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
         (x.is_contiguous() || nhwc_memory(x)) && (x.is_cpu() || (x.is_cuda() && fused_norm_built()));
}

at::Tensor fused_group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                            double eps, bool silu, const at::Tensor& addend) {
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
  if (addend.defined() && (addend.dim() != 2 || addend.size(0) != x.size(0) || addend.size(1) != c ||
                           !addend.is_floating_point())) {
    throw input_error("fused GroupNorm: the addend must be a floating-point [" + std::to_string(x.size(0)) + ", " +
                      std::to_string(c) + "], got " + shape_str(addend.sizes()));
  }
  for (const at::Tensor* p : {&weight, &bias, &addend}) {
    if (p->defined() && p->device() != x.device()) {
      throw input_error("fused GroupNorm: the input is on " + x.device().str() + ", a parameter or the addend on " +
                        p->device().str());
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
  ++g_fused_norm_calls;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  // NHWC memory as it is, where a block's run of channels fits the kernels; any other layout as a contiguous
  // copy.
  const bool nhwc = nhwc_memory(x) && c / groups <= gn_kernel::kNhwcMaxWidth;
  // The addend's rows may lie apart (views of one batched projection, TimeAddendsScope) or repeat (stride 0):
  // the kernels take any row stride, its channels contiguous.
  at::Tensor a = addend.defined() ? addend.to(at::kFloat) : at::empty({0}, f32);
  if (a.numel() > 0 && (a.stride(1) != 1 || (a.size(0) > 1 && a.stride(0) != 0 && a.stride(0) < c))) {
    a = a.contiguous();
  }
  return FusedGroupNormFn::apply(nhwc ? x : x.contiguous(), a,
                                 weight.defined() ? weight.to(at::kFloat).contiguous() : at::ones({c}, f32),
                                 bias.defined() ? bias.to(at::kFloat).contiguous() : at::zeros({c}, f32),
                                 groups, eps, silu);
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
