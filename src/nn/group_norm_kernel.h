// The fused GroupNorm (+ SiLU) kernels' arithmetic, written once for the CUDA kernels
// (src/nn/cuda/group_norm.cu) and for a serial run of the same block program on the CPU
// (src/nn/fused_norm.cpp), which is how the tests check the indexing and the formulas on a machine without a
// GPU.
//
// Layout: x is NCHW and contiguous (channels-last memory has a block program of its own, NhwcTile below). One
// thread block normalizes one (image n, group g): the group's elements are one contiguous run of D = (C / G)
// * HW values starting at (n C + g C/G) HW. Each of the block's T threads takes the elements t, t + T, t +
// 2T, ... of that run (of one channel's HW values in the backward pass), its partial sums are added up over
// the block, and the next phase reads the totals.
//
// Forward, three passes over the group: a first mean m0, then sums of x - m0 and (x - m0)^2 (centred passes
// instead of E[x^2] - E[x]^2, so inputs whose mean is far larger than their spread keep their digits in
// float32), then y = x^ w_c + b_c, SiLU(y) with `silu`, stored in x's type, where x^ = ((x - m0) - shift)
// rstd and the mean is m0 + shift, kept as the two float32 numbers (Moments, [N, G, 3]): x - m0 is exact
// where x is near the mean, and the mean's own rounding (ulp(1000) = 6e-5 for a mean of 1000) stays out of
// x^. Backward, from x and the moments (the pre-activation recomputed, not kept): with u = dL/dy SiLU'(pre)
// (or dL/dy), per channel c of the group dw_c^(n) = sum u x^ and db_c^(n) = sum u over its HW pixels, then dx
// = rstd (u w_c - (sum_c w_c db_c + x^ sum_c w_c dw_c) / D). Optionally x is read as x + a_{n,c} for an
// addend a [N, C] (ResnetBlock2D's time embedding, which would otherwise take a pass of its own forward and a
// reduction backward); a's gradient, dx summed over the channel's pixels, is rstd (w_c db_c - HW (sum_c w_c
// db_c) / D - (sum_c w_c dw_c) / D sum x^), from one more per-channel sum. All arithmetic is float32; only
// the loads and stores are in the tensor's type (float32 or bfloat16, the latter kept as its 16 bits and
// rounded to nearest even like c10::BFloat16).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define DIFFUSE_HD __host__ __device__ __forceinline__
#else
#define DIFFUSE_HD inline
#endif

namespace diffuse {
namespace gn_kernel {

struct Bf16 {
  uint16_t bits;
};

DIFFUSE_HD float float_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
DIFFUSE_HD uint32_t bits_from_float(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DIFFUSE_HD float load(const float* p, int64_t i) { return p[i]; }
DIFFUSE_HD float load(const Bf16* p, int64_t i) { return float_from_bits(static_cast<uint32_t>(p[i].bits) << 16); }
DIFFUSE_HD void store(float* p, int64_t i, float v) { p[i] = v; }
DIFFUSE_HD void store(Bf16* p, int64_t i, float v) {
  const uint32_t u = bits_from_float(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i].bits = 0x7fc0;  // NaN
  } else {
    p[i].bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

DIFFUSE_HD float sigmoid(float v) {
#ifdef __CUDA_ARCH__
  return 1.0f / (1.0f + __expf(-v));
#else
  return 1.0f / (1.0f + std::exp(-v));
#endif
}
DIFFUSE_HD float rsqrt(float v) {
#ifdef __CUDA_ARCH__
  return ::rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

// The problem, shared by every block.
struct Shape {
  int64_t n, c, hw, groups;
  int64_t addend_row =
      0;  // elements from one image's addend row to the next (C when contiguous, 0 broadcast)
  DIFFUSE_HD int64_t cg() const { return c / groups; }
};

// One block's group: block b normalizes image b / G, group b % G.
struct Group {
  int64_t base;   // offset of the group's first element
  int64_t c0;     // its first channel
  int64_t d;      // elements in the group
  int64_t hw;     // pixels per channel
  int64_t stats;  // index of its Moments ([N, G])
  int64_t image;  // n
  DIFFUSE_HD Group(const Shape& s, int64_t block)
      : base(block * s.cg() * s.hw),
        c0((block % s.groups) * s.cg()),
        d(s.cg() * s.hw),
        hw(s.hw),
        stats(block),
        image(block / s.groups) {}
  DIFFUSE_HD int64_t per_channel(const Shape& s, int64_t k) const { return image * s.c + c0 + k; }  // into [N, C]
};

// The normalized input: x [N, C, HW], plus a per-(image, channel) addend [N, C] (float32; its channels
// contiguous, its rows shape.addend_row apart) when `addend` is set (a time embedding added to the
// activations just before the normalization, fused into it).
template <class T>
struct Source {
  const T* x;
  const float* addend;
  Shape shape;
  DIFFUSE_HD float channel_addend(const Group& g, int64_t k) const {
    return addend ? addend[g.image * shape.addend_row + g.c0 + k] : 0.0f;
  }
  DIFFUSE_HD float at(const Group& g, int64_t i, int64_t k) const { return load(x, g.base + i) + channel_addend(g, k); }
};

// ---- forward ----
// Walks a thread's elements t, t + T, ... of the group with their channels, without a division per element.
struct Cursor {
  int64_t i, k, p;  // element of the group, its channel in the group, its pixel
  DIFFUSE_HD Cursor(const Group& g, int64_t t) : i(t), k(t / g.hw), p(t % g.hw) {}
  DIFFUSE_HD void advance(const Group& g, int64_t threads) {
    i += threads;
    p += threads;
    while (p >= g.hw) {
      p -= g.hw;
      ++k;
    }
  }
};

template <class T>
DIFFUSE_HD float forward_sum(const Group& g, const Source<T>& src, int64_t t, int64_t threads) {
  float s = 0.0f;
  for (Cursor e(g, t); e.i < g.d; e.advance(g, threads)) s += src.at(g, e.i, e.k);
  return s;
}
// Sums of x - m0 (first) and (x - m0)^2 (second) about the first pass's mean m0, whose float32 rounding error is
// then corrected: mean = m0 + s1 / D and var = s2 / D - (s1 / D)^2 lose no digits, as s1 is small.
template <class T>
DIFFUSE_HD void forward_centred_sums(const Group& g, const Source<T>& src, float m0, int64_t t, int64_t threads,
                                     float& s1, float& s2) {
  s1 = 0.0f;
  s2 = 0.0f;
  for (Cursor e(g, t); e.i < g.d; e.advance(g, threads)) {
    const float v = src.at(g, e.i, e.k) - m0;
    s1 += v;
    s2 += v * v;
  }
}
// A group's statistics, as kept between the passes and for the backward pass (three floats per group).
struct Moments {
  float m0, shift, rstd;
  DIFFUSE_HD float normalize(float x) const { return ((x - m0) - shift) * rstd; }
  DIFFUSE_HD static Moments read(const float* stats, int64_t group) {
    return Moments{stats[3 * group], stats[3 * group + 1], stats[3 * group + 2]};
  }
  DIFFUSE_HD void write(float* stats, int64_t group) const {
    stats[3 * group] = m0;
    stats[3 * group + 1] = shift;
    stats[3 * group + 2] = rstd;
  }
};
DIFFUSE_HD Moments moments_from(float m0, float s1, float s2, int64_t d, float eps) {
  const float shift = s1 / static_cast<float>(d);
  const float var = s2 / static_cast<float>(d) - shift * shift;
  return Moments{m0, shift, rsqrt((var > 0.0f ? var : 0.0f) + eps)};
}

template <class T>
DIFFUSE_HD void forward_write(const Group& g, const Source<T>& src, const float* w, const float* b, const Moments& m,
                              bool silu, T* y, int64_t t, int64_t threads) {
  for (Cursor e(g, t); e.i < g.d; e.advance(g, threads)) {
    const int64_t c = g.c0 + e.k;
    float v = m.normalize(src.at(g, e.i, e.k)) * w[c] + b[c];
    if (silu) v *= sigmoid(v);
    store(y, g.base + e.i, v);
  }
}

// ---- backward ----
// u = dL/dy SiLU'(pre) at the recomputed pre-activation, or dL/dy without silu.
template <class T>
DIFFUSE_HD float upstream(const T* dy, int64_t i, float xhat, float w, float b, bool silu) {
  const float gy = load(dy, i);
  if (!silu) return gy;
  const float pre = xhat * w + b;
  const float s = sigmoid(pre);
  return gy * s * (1.0f + pre * (1.0f - s));
}
// Channel k of the group (0 <= k < C/G): this thread's share of sum u x^, sum u and sum x^ over its pixels.
template <class T>
DIFFUSE_HD void backward_channel_sums(const Group& g, const Source<T>& src, const T* dy, const float* w,
                                      const float* b, const Moments& m, bool silu, int64_t k, int64_t t,
                                      int64_t threads, float& sum_ux, float& sum_u, float& sum_x) {
  const int64_t c = g.c0 + k;
  const int64_t start = g.base + k * g.hw;
  const float add = src.channel_addend(g, k);
  sum_ux = 0.0f;
  sum_u = 0.0f;
  sum_x = 0.0f;
  for (int64_t p = t; p < g.hw; p += threads) {
    const float xhat = m.normalize(load(src.x, start + p) + add);
    const float u = upstream(dy, start + p, xhat, w[c], b[c], silu);
    sum_ux += u * xhat;
    sum_u += u;
    sum_x += xhat;
  }
}
// a = sum_c w_c db_c / D and bx = sum_c w_c dw_c / D from the group's per-channel totals: dx = rstd (u w - a - x^ bx).
template <class T>
DIFFUSE_HD void backward_write(const Group& g, const Source<T>& src, const T* dy, const float* w, const float* b,
                               const Moments& m, bool silu, float a, float bx, T* dx, int64_t t, int64_t threads) {
  for (Cursor e(g, t); e.i < g.d; e.advance(g, threads)) {
    const int64_t c = g.c0 + e.k, i = g.base + e.i;
    const float xhat = m.normalize(src.at(g, e.i, e.k));
    const float u = upstream(dy, i, xhat, w[c], b[c], silu);
    store(dx, i, m.rstd * (u * w[c] - a - xhat * bx));
  }
}
// The addend's gradient for channel c: dx summed over its HW pixels, rstd (w_c db_c - HW a - bx sum x^).
DIFFUSE_HD float addend_gradient(int64_t hw, const Moments& m, float w, float db, float sum_x, float a,
                                 float bx) {
  return m.rstd * (w * db - static_cast<float>(hw) * a - bx * sum_x);
}

// Threads per block: whole warps, no more than the work of one channel (backward) or group needs, at most 256.
inline int64_t block_threads(const Shape& s) {
  int64_t t = 32;
  while (t < 256 && t < s.hw) t *= 2;
  return t;
}

// ---- channels-last (NHWC) ----
// x is [N, C, H, W] in NHWC memory: element (n, c, p) lies at (n HW + p) C + c, so a group's elements are
// runs of C/G neighbouring values, one run per pixel. One block takes `per_block` neighbouring groups of one
// image (a run of `width` = per_block C/G channels: 32 where C/G divides 32 and G allows) and arranges its
// threads as `rows` rows of `width` lanes: lane l of row r reads channel c_first + l at the pixels r, r +
// rows, ... (a row reads `width` neighbouring values of one pixel), so each thread stays on one channel. A
// channel's sums are its lane's column added over the rows, a group's the sum of its C/G columns; both are
// separate phases of the block program (column_sum, then group_sum), between which the CUDA kernels
// synchronize the block.
struct NhwcTile {
  int64_t per_block;  // groups per block
  int64_t width;      // lanes: channels per block
  int64_t rows;
  DIFFUSE_HD int64_t threads() const { return rows * width; }
  DIFFUSE_HD int64_t blocks(const Shape& s) const { return s.n * (s.groups / per_block); }
};
// The widest run the kernels take (C/G at most this; wider groups go through a contiguous copy).
constexpr int64_t kNhwcMaxWidth = 512;
// Threads per block at most (the kernels' launch bound). Blocks are few (one per run of groups of an image:
// 256 for the fmnist U-Net's first level at batch 128, where the NCHW program has 4,096), so each takes as
// many rows as there are pixels, up to this, to keep the GPU's memory busy.
constexpr int64_t kNhwcMaxThreads = 1024;
inline NhwcTile nhwc_tile(const Shape& s) {
  const int64_t cg = s.cg();
  int64_t k = cg >= 32 ? 1 : 32 / cg;
  while (s.groups % k != 0) --k;
  const int64_t width = k * cg;
  const int64_t rows = std::max<int64_t>(1, std::min(kNhwcMaxThreads / width, s.hw));
  return {k, width, rows};
}

// Thread t of block b: its image, channel, group ([N, G] index) and row, and where its channel's values
// start.
struct NhwcThread {
  int64_t image, c, stats, row, lane, start;
  DIFFUSE_HD NhwcThread(const Shape& s, const NhwcTile& tile, int64_t block, int64_t t) {
    const int64_t blocks_per_image = s.groups / tile.per_block;
    image = block / blocks_per_image;
    lane = t % tile.width;
    row = t / tile.width;
    const int64_t g = (block % blocks_per_image) * tile.per_block + lane / s.cg();
    c = g * s.cg() + lane % s.cg();
    stats = image * s.groups + g;
    start = image * s.hw * s.c + c;
  }
  DIFFUSE_HD int64_t per_channel(const Shape& s) const { return image * s.c + c; }  // into [N, C]
  // The group's index within the block (for the group sums).
  DIFFUSE_HD int64_t group_in_block(const Shape& s) const { return lane / s.cg(); }
};

template <class T>
DIFFUSE_HD float nhwc_at(const Source<T>& src, const NhwcThread& th, int64_t p) {
  return load(src.x, th.start + p * src.shape.c);
}
template <class T>
DIFFUSE_HD float nhwc_addend(const Source<T>& src, const NhwcThread& th) {
  return src.addend ? src.addend[th.image * src.shape.addend_row + th.c] : 0.0f;
}

template <class T>
DIFFUSE_HD float nhwc_forward_sum(const Source<T>& src, const NhwcTile& tile, const NhwcThread& th) {
  const float add = nhwc_addend(src, th);
  float s = 0.0f;
  for (int64_t p = th.row; p < src.shape.hw; p += tile.rows) s += nhwc_at(src, th, p) + add;
  return s;
}
template <class T>
DIFFUSE_HD void nhwc_forward_centred_sums(const Source<T>& src, const NhwcTile& tile, const NhwcThread& th,
                                          float m0, float& s1, float& s2) {
  const float add = nhwc_addend(src, th);
  s1 = 0.0f;
  s2 = 0.0f;
  for (int64_t p = th.row; p < src.shape.hw; p += tile.rows) {
    const float v = (nhwc_at(src, th, p) + add) - m0;
    s1 += v;
    s2 += v * v;
  }
}
template <class T>
DIFFUSE_HD void nhwc_forward_write(const Source<T>& src, const NhwcTile& tile, const NhwcThread& th,
                                   const float* w, const float* b, const Moments& m, bool silu, T* y) {
  const float add = nhwc_addend(src, th), wc = w[th.c], bc = b[th.c];
  for (int64_t p = th.row; p < src.shape.hw; p += tile.rows) {
    float v = m.normalize(nhwc_at(src, th, p) + add) * wc + bc;
    if (silu) v *= sigmoid(v);
    store(y, th.start + p * src.shape.c, v);
  }
}
// This thread's share of its channel's sum u x^, sum u and sum x^.
template <class T>
DIFFUSE_HD void nhwc_backward_sums(const Source<T>& src, const NhwcTile& tile, const NhwcThread& th,
                                   const T* dy, const float* w, const float* b, const Moments& m, bool silu,
                                   float& sum_ux, float& sum_u, float& sum_x) {
  const float add = nhwc_addend(src, th), wc = w[th.c], bc = b[th.c];
  sum_ux = 0.0f;
  sum_u = 0.0f;
  sum_x = 0.0f;
  for (int64_t p = th.row; p < src.shape.hw; p += tile.rows) {
    const float xhat = m.normalize(nhwc_at(src, th, p) + add);
    const float u = upstream(dy, th.start + p * src.shape.c, xhat, wc, bc, silu);
    sum_ux += u * xhat;
    sum_u += u;
    sum_x += xhat;
  }
}
template <class T>
DIFFUSE_HD void nhwc_backward_write(const Source<T>& src, const NhwcTile& tile, const NhwcThread& th,
                                    const T* dy, const float* w, const float* b, const Moments& m, bool silu,
                                    float a, float bx, T* dx) {
  const float add = nhwc_addend(src, th), wc = w[th.c], bc = b[th.c];
  for (int64_t p = th.row; p < src.shape.hw; p += tile.rows) {
    const int64_t i = th.start + p * src.shape.c;
    const float xhat = m.normalize(nhwc_at(src, th, p) + add);
    const float u = upstream(dy, i, xhat, wc, bc, silu);
    store(dx, i, m.rstd * (u * wc - a - xhat * bx));
  }
}
// The block's reductions over per-thread values vals[t] (t = row * width + lane): lane l's column, then group
// j's columns (cols[j C/G ... (j + 1) C/G - 1]); `weights` (w[c_first ...], or nullptr) scales each column.
DIFFUSE_HD float column_sum(const float* vals, const NhwcTile& tile, int64_t lane) {
  float s = 0.0f;
  for (int64_t r = 0; r < tile.rows; ++r) s += vals[r * tile.width + lane];
  return s;
}
DIFFUSE_HD float group_sum(const float* cols, int64_t cg, int64_t j, const float* weights = nullptr) {
  float s = 0.0f;
  for (int64_t k = j * cg; k < (j + 1) * cg; ++k) s += weights ? weights[k] * cols[k] : cols[k];
  return s;
}

}  // namespace gn_kernel
}  // namespace diffuse
