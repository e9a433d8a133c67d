// Batched matrix products for attention on the CPU. Debian's LibTorch sends float32 bmm to the reference
// BLAS (~4 GFLOP/s); the oneDNN library LibTorch already loads has a JIT sgemm about 10x faster. It is
// looked up at run time (dnnl_sgemm, a stable C entry point); without it, at::bmm is used.
// Each product runs single-threaded (OpenMP's thread count set to 1 around the calls) while the batch is
// split over LibTorch's threads: letting oneDNN thread every small product inside or beside LibTorch's
// own OpenMP team was measured to stall for seconds on a busy machine.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>

#include "diffuse/common.h"
#include "nn/blocks.h"

namespace diffuse {
namespace nn_detail {

namespace {

// dnnl_status_t dnnl_sgemm(char transa, char transb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K, float alpha,
//                          const float* A, dnnl_dim_t lda, const float* B, dnnl_dim_t ldb, float beta,
//                          float* C, dnnl_dim_t ldc);   row-major, C = alpha op(A) op(B) + beta C
using SgemmFn = int (*)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                        int64_t, float, float*, int64_t);

struct OneDnn {
  SgemmFn sgemm = nullptr;
  int (*omp_get_max_threads)() = nullptr;  // from the OpenMP runtime LibTorch and oneDNN share
  void (*omp_set_num_threads)(int) = nullptr;
};

const OneDnn& onednn() {
  static const OneDnn lib = [] {
    OneDnn l;
    l.omp_get_max_threads = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
    l.omp_set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
    if (l.omp_get_max_threads && l.omp_set_num_threads) {
      l.sgemm = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "dnnl_sgemm"));
    }
    return l;
  }();
  return lib;
}

// A [B, R, C] operand as sgemm sees it: row-major ('N', ld = stride(1)) or transposed ('T', ld = stride(2)).
struct Operand {
  at::Tensor t;
  char trans = 'N';
  int64_t ld = 0;
};

Operand as_operand(const at::Tensor& x) {
  const int64_t rows = x.size(1), cols = x.size(2);
  if (x.stride(2) == 1 && x.stride(1) >= std::max<int64_t>(1, cols)) return {x, 'N', x.stride(1)};
  if (x.stride(1) == 1 && x.stride(2) >= std::max<int64_t>(1, rows)) return {x, 'T', x.stride(2)};
  at::Tensor c = x.contiguous();
  return {c, 'N', std::max<int64_t>(1, cols)};
}

// c = alpha * a @ b through LibTorch, as diffusers' baddbmm with beta 0 (one rounding); c [B, M, N] contiguous.
void scaled_bmm_into(const at::Tensor& a, const at::Tensor& b, double alpha, at::Tensor& c) {
  if (alpha == 1.0) {
    at::bmm_out(c, a, b);
  } else {
    c.baddbmm_(a, b, 0.0, alpha);
  }
}

// c = alpha * a @ b without autograd; a [B, M, K], b [B, K, N] float32 on the CPU, any strides; c a
// contiguous float32 [B, M, N].
void sgemm_batched_into(const at::Tensor& a, const at::Tensor& b, double alpha, at::Tensor& c) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  const OneDnn& lib = onednn();
  if (!lib.sgemm || batch == 0 || m == 0 || n == 0 || k == 0) return scaled_bmm_into(a, b, alpha, c);
  const Operand oa = as_operand(a), ob = as_operand(b);
  const float* pa = oa.t.data_ptr<float>();
  const float* pb = ob.t.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  const int64_t sa = oa.t.stride(0), sb = ob.t.stride(0), sc = m * n;
  const float fa = static_cast<float>(alpha);
  std::atomic<bool> failed{false};
  auto run = [&](int64_t begin, int64_t end) {
    const SingleThreadedGemm gemm;
    for (int64_t i = begin; i < end; ++i) {
      if (!gemm.run_onednn(oa.trans, ob.trans, m, n, k, fa, pa + i * sa, oa.ld, pb + i * sb, ob.ld, pc + i * sc, n)) {
        failed = true;
      }
    }
  };
  at::parallel_for(0, batch, 1, run);
  if (failed) scaled_bmm_into(a, b, alpha, c);
}

at::Tensor sgemm_batched(const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::Tensor c = at::empty({a.size(0), a.size(1), b.size(2)}, a.options().memory_format(at::MemoryFormat::Contiguous));
  sgemm_batched_into(a, b, alpha, c);
  return c;
}

// alpha x y in the memory layout of `like`: a transposed view ([B, R, C] with R the dense dimension) gets the product
// computed as alpha (y^T x^T) and returned transposed. The gradients of the attention's products then have the layout of
// what they flow back into: the softmax's output (the float32 path multiplies by P^T) and the channel-major q, k, v;
// a row-major gradient there cost a copy of each (LibTorch's softmax backward makes its input contiguous).
at::Tensor product_in_layout_of(const at::Tensor& like, const at::Tensor& x, const at::Tensor& y, double alpha) {
  if (like.stride(1) == 1 && like.stride(2) != 1) {
    return batched_matmul(y.transpose(1, 2), x.transpose(1, 2), alpha).transpose(1, 2);
  }
  return batched_matmul(x, y, alpha);
}

// Autograd wrapper: d(alpha a b)/da = alpha g b^T, d/db = alpha a^T g (differentiable again), each in its operand's
// layout.
struct ScaledBmm : public torch::autograd::Function<ScaledBmm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            double alpha) {
    ctx->save_for_backward({a, b});
    ctx->saved_data["alpha"] = alpha;
    return sgemm_batched(a, b, alpha);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const at::Tensor& g = grads[0];
    at::Tensor ga, gb;
    if (ctx->needs_input_grad(0)) ga = product_in_layout_of(saved[0], g, saved[1].transpose(1, 2), alpha);
    if (ctx->needs_input_grad(1)) gb = product_in_layout_of(saved[1], saved[0].transpose(1, 2), g, alpha);
    return {ga, gb, at::Tensor()};
  }
};

}  // namespace

bool has_fast_cpu_gemm() { return onednn().sgemm != nullptr; }

SingleThreadedGemm::SingleThreadedGemm() {
  const OneDnn& lib = onednn();
  if (lib.sgemm) {
    threads_ = lib.omp_get_max_threads();
    lib.omp_set_num_threads(1);
  }
}

SingleThreadedGemm::~SingleThreadedGemm() {
  if (threads_ > 0) onednn().omp_set_num_threads(threads_);
}

bool SingleThreadedGemm::run_onednn(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                    int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, float beta) const {
  const OneDnn& lib = onednn();
  return lib.sgemm && lib.sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0;
}

void SingleThreadedGemm::accumulate_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                       int64_t ldb, float* c, int64_t ldc) const {
  if (run_onednn('T', 'N', m, n, k, 1.0f, a, lda, b, ldb, c, ldc, 1.0f)) return;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, f32);
  out.addmm_(at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, f32).t(),
             at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, f32));
}

void SingleThreadedGemm::operator()(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                    int64_t ldb, float* c, int64_t ldc) const {
  if (run_onednn('N', 'N', m, n, k, 1.0f, a, lda, b, ldb, c, ldc)) return;
  // No oneDNN sgemm (or it refused): LibTorch's, which runs on this thread inside a parallel region.
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, f32);
  at::mm_out(out, at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, f32),
             at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, f32));
}

bool conv1x1_cpu_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y, bool accumulate) {
  if (!has_fast_cpu_gemm()) return false;
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), k = w.size(0);
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  float* py = y.data_ptr<float>();
  std::atomic<bool> failed{false};
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedGemm gemm;
    for (int64_t i = begin; i < end && !failed; ++i) {
      float* yi = py + i * k * hw;
      if (!gemm.run_onednn('N', 'N', k, hw, c, 1.0f, pw, c, px + i * c * hw, hw, yi, hw, accumulate ? 1.0f : 0.0f)) {
        failed = true;
        break;
      }
      if (pb) {
        for (int64_t r = 0; r < k; ++r) {
          float* row = yi + r * hw;
          const float v = pb[r];
          for (int64_t p = 0; p < hw; ++p) row[p] += v;
        }
      }
    }
  });
  if (failed) throw run_error("1x1 convolution: oneDNN's sgemm refused a product");
  return true;
}

namespace {

constexpr int64_t kConv1x1RowBlock = 16;  // rows of the filters' gradient per task

// The 1x1 convolution's backward without autograd: gx[i] = w^T gy[i] per image, and gw = sum over images of
// gy[i] x[i]^T in fixed blocks of 16 output channels, each adding the images in order: its bits depend on neither
// the thread count nor the batch's split over threads.
void conv1x1_backward_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gy, at::Tensor* gx,
                          at::Tensor* gw) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), k = w.size(0);
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  const float* pg = gy.data_ptr<float>();
  std::atomic<bool> failed{false};
  if (gx) {
    *gx = at::empty_like(x, at::MemoryFormat::Contiguous);
    float* pgx = gx->data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      const SingleThreadedGemm gemm;
      for (int64_t i = begin; i < end && !failed; ++i) {
        if (!gemm.run_onednn('T', 'N', c, hw, k, 1.0f, pw, c, pg + i * k * hw, hw, pgx + i * c * hw, hw)) failed = true;
      }
    });
  }
  if (gw) {
    *gw = at::zeros({k, c}, w.options());
    float* pgw = gw->data_ptr<float>();
    const int64_t blocks = (k + kConv1x1RowBlock - 1) / kConv1x1RowBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const SingleThreadedGemm gemm;
      for (int64_t blk = begin; blk < end && !failed; ++blk) {
        const int64_t r0 = blk * kConv1x1RowBlock, rows = std::min(kConv1x1RowBlock, k - r0);
        for (int64_t i = 0; i < n; ++i) {
          if (!gemm.run_onednn('N', 'T', rows, c, hw, 1.0f, pg + i * k * hw + r0 * hw, hw, px + i * c * hw, hw,
                               pgw + r0 * c, c, 1.0f)) {
            failed = true;
          }
        }
      }
    });
  }
  if (failed) throw run_error("1x1 convolution: oneDNN's sgemm refused a product");
}

// y = w x + b through autograd; x [N, C, H, W] contiguous, w [K, C], b [K] (zeros when the layer has none: LibTorch
// 1.x's custom functions take no undefined inputs), all float32 on the CPU.
struct Conv1x1Fn : public torch::autograd::Function<Conv1x1Fn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& b) {
    ctx->save_for_backward({x, w});
    at::Tensor y = at::empty({x.size(0), w.size(0), x.size(2), x.size(3)}, x.options());
    conv1x1_cpu_into(x, w, b, y, false);
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor gy = grads[0].contiguous();
    at::Tensor gx, gw, gb;
    conv1x1_backward_cpu(saved[0], saved[1], gy, ctx->needs_input_grad(0) ? &gx : nullptr,
                         ctx->needs_input_grad(1) ? &gw : nullptr);
    if (ctx->needs_input_grad(2)) gb = gy.sum({0, 2, 3});
    return {gx, gw, gb};
  }
};

}  // namespace

at::Tensor conv1x1_cpu_train(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return Conv1x1Fn::apply(x, w, b.defined() ? b : at::zeros({w.size(0)}, w.options().requires_grad(false)));
}

at::Tensor batched_matmul(const at::Tensor& a, const at::Tensor& b, double alpha) {
  const bool fast = a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1) &&
                    a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.device().is_cpu() &&
                    b.device().is_cpu() && onednn().sgemm != nullptr && a.layout() == at::kStrided &&
                    b.layout() == at::kStrided;
  if (!fast) {
    // The reference semantics: baddbmm with beta 0 is alpha * a @ b (one rounding, as diffusers).
    if (alpha == 1.0) return at::bmm(a, b);
    return at::baddbmm(at::empty({a.size(0), a.size(1), b.size(2)}, a.options()), a, b, 0.0, alpha);
  }
  return ScaledBmm::apply(a, b, alpha);
}

void batched_matmul_into(const at::Tensor& a, const at::Tensor& b, double alpha, at::Tensor& out) {
  TORCH_CHECK(!at::GradMode::is_enabled() || (!a.requires_grad() && !b.requires_grad()),
              "batched_matmul_into: no autograd");
  TORCH_CHECK(out.is_contiguous() && out.size(0) == a.size(0) && out.size(1) == a.size(1) &&
                  out.size(2) == b.size(2) && out.scalar_type() == a.scalar_type(),
              "batched_matmul_into: out must be a contiguous [B, M, N] of the operands' type");
  if (a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.device().is_cpu() && b.device().is_cpu()) {
    sgemm_batched_into(a, b, alpha, out);
  } else {
    scaled_bmm_into(a, b, alpha, out);
  }
}

}  // namespace nn_detail
}  // namespace diffuse
