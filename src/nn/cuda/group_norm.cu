// The fused GroupNorm (+ SiLU) kernels: one block per (image, group), the phases of group_norm_kernel.h separated
// by block-wide sums (warp shuffles, then one warp over the warps' totals).
#include "nn/cuda/group_norm_cuda.h"

#include <cuda_runtime.h>

namespace diffuse {
namespace gn_cuda {
namespace {

using gn_kernel::Bf16;
using gn_kernel::Group;
using gn_kernel::Moments;
using gn_kernel::NhwcThread;
using gn_kernel::NhwcTile;
using gn_kernel::Shape;
using gn_kernel::Source;

// The sum of v over the block, returned to every thread. blockDim.x is a multiple of 32 (block_threads).
// `scratch` holds 32 float2; the leading barrier lets the previous call's readers finish first.
__device__ float2 block_sum(float2 v, float2* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_down_sync(0xffffffffu, v.x, o);
    v.y += __shfl_down_sync(0xffffffffu, v.y, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : make_float2(0.0f, 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
      v.x += __shfl_down_sync(0xffffffffu, v.x, o);
      v.y += __shfl_down_sync(0xffffffffu, v.y, o);
    }
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

template <class T>
__global__ void forward_kernel(const T* __restrict__ x, const float* __restrict__ addend, const float* __restrict__ w,
                               const float* __restrict__ b, T* __restrict__ y, float* __restrict__ stats, Shape shape,
                               float eps, bool silu) {
  __shared__ float2 scratch[32];
  const Group g(shape, blockIdx.x);
  const Source<T> src{x, addend, shape};
  const int64_t t = threadIdx.x, threads = blockDim.x;
  const float m0 =
      block_sum(make_float2(gn_kernel::forward_sum(g, src, t, threads), 0.0f), scratch).x / static_cast<float>(g.d);
  float2 centred;
  gn_kernel::forward_centred_sums(g, src, m0, t, threads, centred.x, centred.y);
  centred = block_sum(centred, scratch);
  const Moments m = gn_kernel::moments_from(m0, centred.x, centred.y, g.d, eps);
  if (t == 0) m.write(stats, g.stats);
  gn_kernel::forward_write(g, src, w, b, m, silu, y, t, threads);
}

template <class T>
__global__ void backward_kernel(const T* __restrict__ x, const float* __restrict__ addend, const T* __restrict__ dy,
                                const float* __restrict__ w, const float* __restrict__ b,
                                const float* __restrict__ stats, Shape shape, bool silu, T* __restrict__ dx,
                                float* __restrict__ dw_part, float* __restrict__ db_part, float* __restrict__ d_addend) {
  __shared__ float2 scratch[32];
  const Group g(shape, blockIdx.x);
  const Source<T> src{x, addend, shape};
  const int64_t t = threadIdx.x, threads = blockDim.x;
  const Moments m = Moments::read(stats, g.stats);
  float a = 0.0f, bx = 0.0f;
  for (int64_t k = 0; k < shape.cg(); ++k) {
    float2 s;
    float sum_x;
    gn_kernel::backward_channel_sums(g, src, dy, w, b, m, silu, k, t, threads, s.x, s.y, sum_x);
    s = block_sum(s, scratch);
    const int64_t c = g.c0 + k, nc = g.per_channel(shape, k);
    if (d_addend) sum_x = block_sum(make_float2(sum_x, 0.0f), scratch).x;
    if (t == 0) {
      dw_part[nc] = s.x;
      db_part[nc] = s.y;
      if (d_addend) d_addend[nc] = sum_x;  // until a and bx are known
    }
    bx += w[c] * s.x;
    a += w[c] * s.y;
  }
  const float d = static_cast<float>(g.d);
  if (d_addend && t == 0) {
    for (int64_t k = 0; k < shape.cg(); ++k) {
      const int64_t nc = g.per_channel(shape, k);
      d_addend[nc] =
          gn_kernel::addend_gradient(g.hw, m, w[g.c0 + k], db_part[nc], d_addend[nc], a / d, bx / d);
    }
  }
  gn_kernel::backward_write(g, src, dy, w, b, m, silu, a / d, bx / d, dx, t, threads);
}

// ---- channels-last: the block program of gn_kernel::NhwcTile; shared memory holds the per-thread values,
// then the columns, then the groups' results ----
template <class T>
__global__ void __launch_bounds__(gn_kernel::kNhwcMaxThreads)
    nhwc_forward_kernel(const T* __restrict__ x, const float* __restrict__ addend,
                        const float* __restrict__ w, const float* __restrict__ b, T* __restrict__ y,
                        float* __restrict__ stats, Shape shape, NhwcTile tile, float eps, bool silu) {
  extern __shared__ float shared[];
  const int64_t threads = tile.threads(), width = tile.width, cg = shape.cg();
  float* vals = shared;                // [2, threads]
  float* cols = vals + 2 * threads;    // [2, width]
  float* m0s = cols + 2 * width;       // [per_block]
  float* moms = m0s + tile.per_block;  // [per_block, 3]
  const int64_t t = threadIdx.x;
  const NhwcThread th(shape, tile, blockIdx.x, t);
  const Source<T> src{x, addend, shape};
  const int64_t j = th.group_in_block(shape);
  const float d = static_cast<float>(cg * shape.hw);
  vals[t] = gn_kernel::nhwc_forward_sum(src, tile, th);
  __syncthreads();
  if (t < width) cols[t] = gn_kernel::column_sum(vals, tile, t);
  __syncthreads();
  if (t < tile.per_block) m0s[t] = gn_kernel::group_sum(cols, cg, t) / d;
  __syncthreads();
  const float m0 = m0s[j];
  float s1, s2;
  gn_kernel::nhwc_forward_centred_sums(src, tile, th, m0, s1, s2);
  vals[t] = s1;
  vals[threads + t] = s2;
  __syncthreads();
  if (t < width) {
    cols[t] = gn_kernel::column_sum(vals, tile, t);
    cols[width + t] = gn_kernel::column_sum(vals + threads, tile, t);
  }
  __syncthreads();
  if (t < tile.per_block) {
    const Moments m = gn_kernel::moments_from(m0s[t], gn_kernel::group_sum(cols, cg, t),
                                              gn_kernel::group_sum(cols + width, cg, t), cg * shape.hw, eps);
    m.write(moms, t);
    m.write(stats, th.stats - j + t);
  }
  __syncthreads();
  gn_kernel::nhwc_forward_write(src, tile, th, w, b, Moments::read(moms, j), silu, y);
}

template <class T>
__global__ void __launch_bounds__(gn_kernel::kNhwcMaxThreads)
    nhwc_backward_kernel(const T* __restrict__ x, const float* __restrict__ addend, const T* __restrict__ dy,
                         const float* __restrict__ w, const float* __restrict__ b,
                         const float* __restrict__ stats, Shape shape, NhwcTile tile, bool silu,
                         T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part,
                         float* __restrict__ d_addend) {
  extern __shared__ float shared[];
  const int64_t threads = tile.threads(), width = tile.width, cg = shape.cg();
  float* vals = shared;              // [3, threads]
  float* cols = vals + 3 * threads;  // [3, width]: sum u x^, sum u, sum x^ per channel
  float* ab = cols + 3 * width;      // [per_block, 2]: a, bx
  const int64_t t = threadIdx.x;
  const NhwcThread th(shape, tile, blockIdx.x, t);
  const Source<T> src{x, addend, shape};
  const int64_t j = th.group_in_block(shape);
  const Moments m = Moments::read(stats, th.stats);
  float sum_ux, sum_u, sum_x;
  gn_kernel::nhwc_backward_sums(src, tile, th, dy, w, b, m, silu, sum_ux, sum_u, sum_x);
  vals[t] = sum_ux;
  vals[threads + t] = sum_u;
  vals[2 * threads + t] = sum_x;
  __syncthreads();
  if (t < width) {
    for (int q = 0; q < 3; ++q) cols[q * width + t] = gn_kernel::column_sum(vals + q * threads, tile, t);
    dw_part[th.per_channel(shape)] = cols[t];
    db_part[th.per_channel(shape)] = cols[width + t];
  }
  __syncthreads();
  const float d = static_cast<float>(cg * shape.hw);
  const float* wb = w + (th.c - th.lane);  // the block's first channel's weight
  if (t < tile.per_block) {
    ab[2 * t] = gn_kernel::group_sum(cols + width, cg, t, wb) / d;
    ab[2 * t + 1] = gn_kernel::group_sum(cols, cg, t, wb) / d;
  }
  __syncthreads();
  const float a = ab[2 * j], bx = ab[2 * j + 1];
  if (d_addend && t < width) {
    d_addend[th.per_channel(shape)] =
        gn_kernel::addend_gradient(shape.hw, m, w[th.c], cols[width + t], cols[2 * width + t], a, bx);
  }
  gn_kernel::nhwc_backward_write(src, tile, th, dy, w, b, m, silu, a, bx, dx);
}

// The NHWC kernels' launch: one block per tile, the tile's threads, and shared memory of `per_thread` floats
// per thread, `per_lane` per lane and `per_group` per group of the block.
struct NhwcLaunch {
  NhwcLaunch(const Shape& shape, int64_t per_thread, int64_t per_lane, int64_t per_group)
      : tile(gn_kernel::nhwc_tile(shape)),
        grid(static_cast<unsigned>(tile.blocks(shape))),
        block(static_cast<unsigned>(tile.threads())),
        smem(sizeof(float) * static_cast<size_t>(per_thread * tile.threads() + per_lane * tile.width +
                                                 per_group * tile.per_block)) {}
  static cudaStream_t stream(void* s) { return static_cast<cudaStream_t>(s); }
  NhwcTile tile;
  dim3 grid, block;
  size_t smem;
};

const char* launched() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* forward(bool bf16, const void* x, const float* addend, const float* w, const float* b, void* y,
                    float* stats, const Shape& shape, float eps, bool silu, void* stream) {
  const dim3 grid(static_cast<unsigned>(shape.n * shape.groups));
  const dim3 block(static_cast<unsigned>(gn_kernel::block_threads(shape)));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bf16) {
    forward_kernel<Bf16><<<grid, block, 0, s>>>(static_cast<const Bf16*>(x), addend, w, b, static_cast<Bf16*>(y), stats,
                                                shape, eps, silu);
  } else {
    forward_kernel<float><<<grid, block, 0, s>>>(static_cast<const float*>(x), addend, w, b, static_cast<float*>(y),
                                                 stats, shape, eps, silu);
  }
  return launched();
}

const char* backward(bool bf16, const void* x, const float* addend, const void* dy, const float* w, const float* b,
                     const float* stats, const Shape& shape, bool silu, void* dx, float* dw_part, float* db_part,
                     float* d_addend, void* stream) {
  const dim3 grid(static_cast<unsigned>(shape.n * shape.groups));
  const dim3 block(static_cast<unsigned>(gn_kernel::block_threads(shape)));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bf16) {
    backward_kernel<Bf16><<<grid, block, 0, s>>>(static_cast<const Bf16*>(x), addend, static_cast<const Bf16*>(dy), w,
                                                 b, stats, shape, silu, static_cast<Bf16*>(dx), dw_part, db_part,
                                                 d_addend);
  } else {
    backward_kernel<float><<<grid, block, 0, s>>>(static_cast<const float*>(x), addend, static_cast<const float*>(dy),
                                                  w, b, stats, shape, silu, static_cast<float*>(dx), dw_part, db_part,
                                                  d_addend);
  }
  return launched();
}

const char* forward_nhwc(bool bf16, const void* x, const float* addend, const float* w, const float* b,
                         void* y, float* stats, const Shape& shape, float eps, bool silu, void* stream) {
  const NhwcLaunch l(shape, 2, 2, 4);  // shared: vals [2, threads], cols [2, width], m0 and moments per group
  if (bf16) {
    nhwc_forward_kernel<Bf16><<<l.grid, l.block, l.smem, l.stream(stream)>>>(
        static_cast<const Bf16*>(x), addend, w, b, static_cast<Bf16*>(y), stats, shape, l.tile, eps, silu);
  } else {
    nhwc_forward_kernel<float><<<l.grid, l.block, l.smem, l.stream(stream)>>>(
        static_cast<const float*>(x), addend, w, b, static_cast<float*>(y), stats, shape, l.tile, eps, silu);
  }
  return launched();
}

const char* backward_nhwc(bool bf16, const void* x, const float* addend, const void* dy, const float* w,
                          const float* b, const float* stats, const Shape& shape, bool silu, void* dx,
                          float* dw_part, float* db_part, float* d_addend, void* stream) {
  const NhwcLaunch l(shape, 3, 3, 2);  // shared: vals [3, threads], cols [3, width], a and bx per group
  if (bf16) {
    nhwc_backward_kernel<Bf16><<<l.grid, l.block, l.smem, l.stream(stream)>>>(
        static_cast<const Bf16*>(x), addend, static_cast<const Bf16*>(dy), w, b, stats, shape, l.tile, silu,
        static_cast<Bf16*>(dx), dw_part, db_part, d_addend);
  } else {
    nhwc_backward_kernel<float><<<l.grid, l.block, l.smem, l.stream(stream)>>>(
        static_cast<const float*>(x), addend, static_cast<const float*>(dy), w, b, stats, shape, l.tile, silu,
        static_cast<float*>(dx), dw_part, db_part, d_addend);
  }
  return launched();
}

}  // namespace gn_cuda
}  // namespace diffuse
