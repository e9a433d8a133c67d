// 3x3 convolutions (stride 1, padding 1) on the CPU in float32 by Winograd's minimal filtering F(4x4, 3x3)
// (Lavin & Gray 2016): each 4x4 output tile comes from its 6x6 input tile with 36 multiplications per pair of
// input and output channels instead of the direct method's 144. The project's own kernels, the default for CPU
// float32 3x3 convolutions wherever they apply (src/nn/winograd.cpp): every LibTorch 2.x's oneDNN 3 has no Winograd
// kernels, and on Debian 12's oneDNN 2 these are as fast in training and faster in inference (bench_cpu_kernels).
//
// The work is split into blocks of tile rows, about kTargetTiles tiles each, so that a block's operands stay in
// cache; the blocks run in parallel. Per block:
//   pack        the block's input rows, NCHW -> zero-padded [row][column][channel] by 8x8 register transposes (the
//               two rows that consecutive tile rows share are packed once)
//   transform   V[xi][tile][c] = (B^T d B)[xi] for each 6x6 input tile d, vectorized over the channels
//   multiply    M[xi] = V[xi] U[xi] for the 36 positions xi: [tiles x C] times [C x K], one sgemm each
//   transform   each 4x4 output tile A^T M A, plus the bias, then written to the NCHW output
// with U[xi] = (G g G^T)[xi] from the filters g: computed on every training call, cached per weight tensor (and
// its version) for inference. The gradient of the input is the same convolution of the output's gradient with the
// flipped, transposed filters; the filters' gradient is G^T [sum over tiles V^T dM] G with dM = A dY A^T
// (f43_filter_transform_grad, f43_filters_grad).
#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu_clones.h"
#include "diffuse/nn/precision.h"
#include "nn/blocks.h"

namespace diffuse {
namespace nn_detail {

namespace {

constexpr int64_t kTargetTiles = 128;  // rows of each block's products
constexpr int64_t kChunk = 64;         // channels per pass of a transform (its temporaries stay in L1)

// 8x8 transposes in registers (GCC/clang vector extensions: AVX2 or AVX-512 shuffles in the clones), for the
// NCHW <-> [column][channel] reorders around the transforms. Three butterfly stages: the one for distance d swaps
// element (i, j) with (i ^ d, j ^ d) where bit d of i and of j differ; after d = 1, 2, 4 element (i, j) is at (j, i).
typedef float F8 __attribute__((vector_size(32)));
#if defined(__clang__)
#define DIFFUSE_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
typedef int I8 __attribute__((vector_size(32)));
#define DIFFUSE_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shuffle(a, b, I8{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// dst row k (8 floats at dst + k ds) = column k of the 8 rows of 8 floats at src + r ss.
__attribute__((always_inline)) inline void transpose8x8(const float* __restrict__ src, int64_t ss,
                                                        float* __restrict__ dst, int64_t ds) {
  F8 r[8];
  for (int k = 0; k < 8; ++k) __builtin_memcpy(&r[k], src + k * ss, sizeof(F8));
  for (int i = 0; i < 8; i += 2) {  // d = 1
    const F8 a = r[i], b = r[i + 1];
    r[i] = DIFFUSE_SHUFFLE8(a, b, 0, 8, 2, 10, 4, 12, 6, 14);
    r[i + 1] = DIFFUSE_SHUFFLE8(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i : {0, 1, 4, 5}) {  // d = 2
    const F8 a = r[i], b = r[i + 2];
    r[i] = DIFFUSE_SHUFFLE8(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
    r[i + 2] = DIFFUSE_SHUFFLE8(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {  // d = 4
    const F8 a = r[i], b = r[i + 4];
    r[i] = DIFFUSE_SHUFFLE8(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = DIFFUSE_SHUFFLE8(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int k = 0; k < 8; ++k) __builtin_memcpy(dst + k * ds, &r[k], sizeof(F8));
}

// dst[col * ds + row] = src[row * ss + col] for rows x cols: 8x8 blocks in registers, the edges element by element.
// Both always inlined: a call would reach the baseline copy from the callers' AVX-512 and AVX2 clones.
__attribute__((always_inline)) inline void transpose_block(const float* __restrict__ src, int64_t ss, int64_t rows,
                                                           int64_t cols, float* __restrict__ dst, int64_t ds) {
  int64_t r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) transpose8x8(src + r0 * ss + c0, ss, dst + c0 * ds + r0, ds);
    for (; c0 < cols; ++c0)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c0 * ds + r] = src[r * ss + c0];
  }
  for (; r0 < rows; ++r0)
    for (int64_t c = 0; c < cols; ++c) dst[c * ds + r0] = src[r0 * ss + c];
}

// Rows row0 .. row0 + rows - 1 of a C x H x W image (zero outside it) into p[i][col][c], col = 0 .. wp - 1 standing
// for image columns -1 .. wp - 2.
DIFFUSE_CPU_CLONES void pack_rows(const float* __restrict__ img, int64_t c_in, int64_t h_in, int64_t w_in,
                                  int64_t row0, int64_t rows, int64_t wp, float* __restrict__ p) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = p + i * wp * c_in;
    const int64_t h = row0 + i;
    if (h < 0 || h >= h_in) {
      std::fill(row, row + wp * c_in, 0.0f);
      continue;
    }
    std::fill(row, row + c_in, 0.0f);
    std::fill(row + (w_in + 1) * c_in, row + wp * c_in, 0.0f);
    transpose_block(img + h * w_in, h_in * w_in, c_in, w_in, row + c_in, c_in);
  }
}

// Packs the input rows of tile row r (of the tile rows first .. r of a batch's images, th per image) into p, a
// buffer of consecutive packed rows, and returns where they start: tile rows of one image share two rows, so
// after its first only the four new rows are packed. Tile row r of image r / th reads its rows 4 (r % th) - 1 ..
// 4 (r % th) + 4, held in p from row 4 (r - s) on, s being the image's first tile row at or after `first`.
float* pack_tile_row(const float* img, int64_t c_in, int64_t h, int64_t w, int64_t th, int64_t wp, int64_t first,
                     int64_t r, float* p) {
  const int64_t row = r % th, s = std::max(first, r - row);
  const int64_t rs = wp * c_in;
  if (r == s) {
    pack_rows(img, c_in, h, w, 4 * row - 1, 6, wp, p);
  } else {
    pack_rows(img, c_in, h, w, 4 * row + 1, 4, wp, p + (4 * (r - s) + 2) * rs);
  }
  return p + 4 * (r - s) * rs;
}

// V[xi][t0 + j][c] = (B^T d B)[xi] for the tw tiles of one packed tile row (d: 6 rows of p starting at column 4j);
// xi stride vs.
DIFFUSE_CPU_CLONES void input_transform_row(const float* __restrict__ p, int64_t wp, int64_t c_in, int64_t tw,
                                            float* __restrict__ v, int64_t vs) {
  float tmp[6][6][kChunk];
  const int64_t rs = wp * c_in;
  for (int64_t j = 0; j < tw; ++j) {
    const float* d = p + 4 * j * c_in;
    float* out = v + j * c_in;
    for (int64_t c0 = 0; c0 < c_in; c0 += kChunk) {
      const int64_t cn = std::min(kChunk, c_in - c0);
      // Columns: tmp[.][col] = B^T d[.][col].
      for (int col = 0; col < 6; ++col) {
        const float* d0 = d + col * c_in + c0;
        const float *d1 = d0 + rs, *d2 = d0 + 2 * rs, *d3 = d0 + 3 * rs, *d4 = d0 + 4 * rs, *d5 = d0 + 5 * rs;
        for (int64_t c = 0; c < cn; ++c) {
          tmp[0][col][c] = 4.0f * d0[c] - 5.0f * d2[c] + d4[c];
          tmp[1][col][c] = -4.0f * (d1[c] + d2[c]) + d3[c] + d4[c];
          tmp[2][col][c] = 4.0f * (d1[c] - d2[c]) - d3[c] + d4[c];
          tmp[3][col][c] = 2.0f * (d3[c] - d1[c]) - d2[c] + d4[c];
          tmp[4][col][c] = 2.0f * (d1[c] - d3[c]) - d2[c] + d4[c];
          tmp[5][col][c] = 4.0f * d1[c] - 5.0f * d3[c] + d5[c];
        }
      }
      // Rows: V[i][.] = tmp[i][.] B.
      for (int i = 0; i < 6; ++i) {
        const float *t0 = tmp[i][0], *t1 = tmp[i][1], *t2 = tmp[i][2], *t3 = tmp[i][3], *t4 = tmp[i][4],
                    *t5 = tmp[i][5];
        float* o = out + (i * 6) * vs + c0;
        for (int64_t c = 0; c < cn; ++c) {
          o[c] = 4.0f * t0[c] - 5.0f * t2[c] + t4[c];
          o[vs + c] = -4.0f * (t1[c] + t2[c]) + t3[c] + t4[c];
          o[2 * vs + c] = 4.0f * (t1[c] - t2[c]) - t3[c] + t4[c];
          o[3 * vs + c] = 2.0f * (t3[c] - t1[c]) - t2[c] + t4[c];
          o[4 * vs + c] = 2.0f * (t1[c] - t3[c]) - t2[c] + t4[c];
          o[5 * vs + c] = 4.0f * t1[c] - 5.0f * t3[c] + t5[c];
        }
      }
    }
  }
}

// The tw output tiles of one tile row, A^T M[.][t0 + j] A + bias, into q[a][4j + b][k] (4 rows of 4 tw columns);
// M's xi stride ms.
DIFFUSE_CPU_CLONES void output_transform_row(const float* __restrict__ m, int64_t ms, int64_t k_out, int64_t tw,
                                             const float* __restrict__ bias, float* __restrict__ q) {
  float tmp[4][6][kChunk];
  const int64_t qs = 4 * tw * k_out;  // q's row stride
  for (int64_t j = 0; j < tw; ++j) {
    const float* in = m + j * k_out;
    for (int64_t k0 = 0; k0 < k_out; k0 += kChunk) {
      const int64_t kn = std::min(kChunk, k_out - k0);
      // Columns: tmp[.][col] = A^T M[.][col].
      for (int col = 0; col < 6; ++col) {
        const float* m0 = in + col * ms + k0;
        const float *m1 = m0 + 6 * ms, *m2 = m0 + 12 * ms, *m3 = m0 + 18 * ms, *m4 = m0 + 24 * ms, *m5 = m0 + 30 * ms;
        for (int64_t k = 0; k < kn; ++k) {
          const float s12 = m1[k] + m2[k], d12 = m1[k] - m2[k], s34 = m3[k] + m4[k], d34 = m3[k] - m4[k];
          tmp[0][col][k] = m0[k] + s12 + s34;
          tmp[1][col][k] = d12 + 2.0f * d34;
          tmp[2][col][k] = s12 + 4.0f * s34;
          tmp[3][col][k] = d12 + 8.0f * d34 + m5[k];
        }
      }
      // Rows: Y[a][.] = tmp[a][.] A, plus the bias.
      for (int a = 0; a < 4; ++a) {
        const float *t0 = tmp[a][0], *t1 = tmp[a][1], *t2 = tmp[a][2], *t3 = tmp[a][3], *t4 = tmp[a][4],
                    *t5 = tmp[a][5];
        float* o = q + a * qs + 4 * j * k_out + k0;
        const float* b = bias + k0;
        for (int64_t k = 0; k < kn; ++k) {
          const float s12 = t1[k] + t2[k], d12 = t1[k] - t2[k], s34 = t3[k] + t4[k], d34 = t3[k] - t4[k];
          o[k] = t0[k] + s12 + s34 + b[k];
          o[k_out + k] = d12 + 2.0f * d34 + b[k];
          o[2 * k_out + k] = s12 + 4.0f * s34 + b[k];
          o[3 * k_out + k] = d12 + 8.0f * d34 + t5[k] + b[k];
        }
      }
    }
  }
}

// rows x w_out of q[a][col][k] (row length q_cols) into the NCHW image y (its row `row0`).
DIFFUSE_CPU_CLONES void unpack_rows(const float* __restrict__ q, int64_t k_out, int64_t q_cols, int64_t rows,
                                    int64_t h_out, int64_t w_out, int64_t row0, float* __restrict__ y) {
  for (int64_t a = 0; a < rows; ++a) {
    const float* qa = q + a * q_cols * k_out;
    float* ya = y + (row0 + a) * w_out;
    transpose_block(qa, k_out, w_out, k_out, ya, h_out * w_out);
  }
}

// A thread's working memory, kept between calls: a fresh allocation of megabytes would be page-faulted in again
// on every convolution.
struct Workspace {
  std::unique_ptr<float[]> data;
  int64_t size = 0;
  float* get(int64_t n) {
    if (n > size) {
      data.reset();
      data.reset(new float[n]);
      size = n;
    }
    return data.get();
  }
};

// y = x * g + bias for x [N, C, H, W] contiguous, u = the filters' transform [36, C, K]; bias may be undefined.
at::Tensor f43_forward(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias) {
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), k_out = u.size(2);
  at::Tensor y = at::empty({n, k_out, h, w}, x.options());
  if (y.numel() == 0) return y;
  const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, wp = 4 * tw + 2;
  const int64_t tile_rows = n * th;
  // Tile rows per block: about kTargetTiles tiles, and at least one block per thread.
  int64_t per_block = std::max<int64_t>(1, (kTargetTiles + tw - 1) / tw);
  per_block = std::min(per_block, std::max<int64_t>(1, (tile_rows + at::get_num_threads() - 1) / at::get_num_threads()));
  const int64_t blocks = (tile_rows + per_block - 1) / per_block;
  const int64_t tiles = per_block * tw;  // a block's tile capacity: V's and M's xi stride in rows
  std::vector<float> zero_bias;
  const float* pb = nullptr;
  at::Tensor bias_c;
  if (bias.defined()) {
    bias_c = bias.contiguous();
    pb = bias_c.data_ptr<float>();
  } else {
    zero_bias.assign(static_cast<size_t>(k_out), 0.0f);
    pb = zero_bias.data();
  }
  const float* px = x.data_ptr<float>();
  const float* pu = u.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    const SingleThreadedGemm gemm;
    thread_local Workspace workspace;
    const int64_t p_size = (4 * per_block + 2) * wp * c_in, v_size = 36 * tiles * c_in, m_size = 36 * tiles * k_out;
    float* const base = workspace.get(p_size + v_size + m_size + 4 * 4 * tw * k_out);
    float* const p = base;
    float* const v = p + p_size;
    float* const m = v + v_size;
    float* const q = m + m_size;
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      const int64_t r_begin = blk * per_block, r_end = std::min(tile_rows, r_begin + per_block);
      for (int64_t r = r_begin; r < r_end; ++r) {
        const float* pr = pack_tile_row(px + (r / th) * c_in * h * w, c_in, h, w, th, wp, r_begin, r, p);
        input_transform_row(pr, wp, c_in, tw, v + (r - r_begin) * tw * c_in, tiles * c_in);
      }
      const int64_t rows_tiles = (r_end - r_begin) * tw;
      for (int64_t xi = 0; xi < 36; ++xi) {
        gemm(rows_tiles, k_out, c_in, v + xi * tiles * c_in, c_in, pu + xi * c_in * k_out, k_out,
             m + xi * tiles * k_out, k_out);
      }
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t img = r / th, row = r % th;
        output_transform_row(m + (r - r_begin) * tw * k_out, tiles * k_out, k_out, tw, pb, q);
        unpack_rows(q, k_out, 4 * tw, std::min<int64_t>(4, h - 4 * row), h, w, 4 * row,
                    py + img * k_out * h * w);
      }
    }
  });
  return y;
}

// The output gradient's rows row0 .. row0 + 3 of a K x H x W image (zero below it) into q[a][col][k], col = 0 .. cols - 1
// (zero right of it): the layout unpack_rows reads, written the other way.
DIFFUSE_CPU_CLONES void pack_grad_rows(const float* __restrict__ gy, int64_t k_out, int64_t h_out, int64_t w_out,
                                       int64_t row0, int64_t cols, float* __restrict__ q) {
  for (int64_t a = 0; a < 4; ++a) {
    float* qa = q + a * cols * k_out;
    const int64_t h = row0 + a;
    if (h >= h_out) {
      std::fill(qa, qa + cols * k_out, 0.0f);
      continue;
    }
    std::fill(qa + w_out * k_out, qa + cols * k_out, 0.0f);
    transpose_block(gy + h * w_out, h_out * w_out, k_out, w_out, qa, k_out);
  }
}

// The gradient with respect to M of the tw output tiles of one packed row q (4 rows of 4 tw columns, see
// output_transform_row): dM[xi][j][k] = (A dY A^T)[xi], A = (A^T)^T; dM's xi stride ms.
DIFFUSE_CPU_CLONES void grad_transform_row(const float* __restrict__ q, int64_t k_out, int64_t tw,
                                           float* __restrict__ dm, int64_t ms) {
  float tmp[6][4][kChunk];
  const int64_t qs = 4 * tw * k_out;
  for (int64_t j = 0; j < tw; ++j) {
    for (int64_t k0 = 0; k0 < k_out; k0 += kChunk) {
      const int64_t kn = std::min(kChunk, k_out - k0);
      // Columns: tmp[.][b] = A dY[.][b]; A's rows are (1 0 0 0), (1 1 1 1), (1 -1 1 -1), (1 2 4 8), (1 -2 4 -8),
      // (0 0 0 1).
      for (int b = 0; b < 4; ++b) {
        const float* y0 = q + (4 * j + b) * k_out + k0;
        const float *y1 = y0 + qs, *y2 = y0 + 2 * qs, *y3 = y0 + 3 * qs;
        for (int64_t k = 0; k < kn; ++k) {
          const float e = y0[k] + y2[k], o = y1[k] + y3[k], f = y0[k] + 4.0f * y2[k], g = 2.0f * y1[k] + 8.0f * y3[k];
          tmp[0][b][k] = y0[k];
          tmp[1][b][k] = e + o;
          tmp[2][b][k] = e - o;
          tmp[3][b][k] = f + g;
          tmp[4][b][k] = f - g;
          tmp[5][b][k] = y3[k];
        }
      }
      // Rows: dM[i][.] = tmp[i][.] A^T.
      for (int i = 0; i < 6; ++i) {
        const float *t0 = tmp[i][0], *t1 = tmp[i][1], *t2 = tmp[i][2], *t3 = tmp[i][3];
        float* o = dm + (i * 6) * ms + j * k_out + k0;
        for (int64_t k = 0; k < kn; ++k) {
          const float e = t0[k] + t2[k], od = t1[k] + t3[k], f = t0[k] + 4.0f * t2[k], g = 2.0f * t1[k] + 8.0f * t3[k];
          o[k] = t0[k];
          o[ms + k] = e + od;
          o[2 * ms + k] = e - od;
          o[3 * ms + k] = f + g;
          o[4 * ms + k] = f - g;
          o[5 * ms + k] = t3[k];
        }
      }
    }
  }
}

constexpr int64_t kGradChunkTiles = 512;  // tiles per pass of the filters' gradient

// dU [36, C, K] = sum over tiles of V[xi]^T dM[xi] for x [N, C, H, W] and the output's gradient gy [N, K, H, W], both
// contiguous: the gradient with respect to the transformed filters. Tiles go in passes of a fixed number of tile
// rows, each pass's 36 products added in turn, so the sum's order depends on neither the thread count nor the batch's
// split.
at::Tensor f43_filter_transform_grad(const at::Tensor& x, const at::Tensor& gy) {
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), k_out = gy.size(1);
  at::Tensor du = at::zeros({36, c_in, k_out}, x.options());
  if (n == 0 || h == 0 || w == 0 || c_in == 0 || k_out == 0) return du;
  const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, wp = 4 * tw + 2;
  const int64_t tile_rows = n * th;
  const int64_t rows_per_pass = std::min(tile_rows, std::max<int64_t>(1, kGradChunkTiles / tw));
  const int64_t pass_tiles = rows_per_pass * tw;
  at::Tensor v = at::empty({36, pass_tiles, c_in}, x.options());
  at::Tensor dm = at::empty({36, pass_tiles, k_out}, x.options());
  const float* px = x.data_ptr<float>();
  const float* pgy = gy.data_ptr<float>();
  float* pv = v.data_ptr<float>();
  float* pdm = dm.data_ptr<float>();
  float* pdu = du.data_ptr<float>();
  for (int64_t r0 = 0; r0 < tile_rows; r0 += rows_per_pass) {
    const int64_t r1 = std::min(tile_rows, r0 + rows_per_pass);
    at::parallel_for(r0, r1, 1, [&](int64_t r_begin, int64_t r_end) {
      thread_local Workspace workspace;
      const int64_t p_size = (4 * (r_end - r_begin) + 2) * wp * c_in;
      float* const p = workspace.get(p_size + 4 * 4 * tw * k_out);
      float* const q = p + p_size;
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t img = r / th, row = r % th;
        const float* pr = pack_tile_row(px + img * c_in * h * w, c_in, h, w, th, wp, r_begin, r, p);
        input_transform_row(pr, wp, c_in, tw, pv + (r - r0) * tw * c_in, pass_tiles * c_in);
        pack_grad_rows(pgy + img * k_out * h * w, k_out, h, w, 4 * row, 4 * tw, q);
        grad_transform_row(q, k_out, tw, pdm + (r - r0) * tw * k_out, pass_tiles * k_out);
      }
    });
    const int64_t tiles = (r1 - r0) * tw;
    at::parallel_for(0, 36, 1, [&](int64_t xi_begin, int64_t xi_end) {
      const SingleThreadedGemm gemm;
      for (int64_t xi = xi_begin; xi < xi_end; ++xi) {
        gemm.accumulate_tn(c_in, k_out, tiles, pv + xi * pass_tiles * c_in, c_in, pdm + xi * pass_tiles * k_out, k_out,
                           pdu + xi * c_in * k_out, k_out);
      }
    });
  }
  return du;
}

// G (6 x 3) of F(4x4, 3x3); the filter transform of a tap (a, b) at position (i, j) is G[i][a] G[j][b].
constexpr double kG[6][3] = {{0.25, 0.0, 0.0},
                             {-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0},
                             {-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0},
                             {1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0},
                             {1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0},
                             {0.0, 0.0, 1.0}};

// [36, 9]: row i * 6 + j holds G[i][a] G[j][b] at a * 3 + b, so that the transform of filters [3 x 3, C K] is one product.
const at::Tensor& f43_kron() {
  static const at::Tensor* k = [] {  // never destroyed: may be used during static destruction
    auto* t = new at::Tensor(at::empty({36, 9}, at::kFloat));
    float* p = t->data_ptr<float>();
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 6; ++j)
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) p[(i * 6 + j) * 9 + a * 3 + b] = static_cast<float>(kG[i][a] * kG[j][b]);
    return t;
  }();
  return *k;
}

// U [36, C, K] = (G g G^T) for filters g [K, C, 3, 3] (any strides): one [36 x 9] times [9 x C K] product.
at::Tensor f43_filters(const at::Tensor& g) {
  const int64_t k_out = g.size(0), c_in = g.size(1);
  const at::Tensor taps = g.detach().permute({2, 3, 1, 0}).contiguous();  // [3, 3, C, K]
  at::Tensor u = at::empty({36, c_in, k_out}, taps.options());
  const SingleThreadedGemm gemm;
  gemm(36, c_in * k_out, 9, f43_kron().data_ptr<float>(), 9, taps.data_ptr<float>(), c_in * k_out, u.data_ptr<float>(),
       c_in * k_out);
  return u;
}

// The filters' gradient [K, C, 3, 3] from the transformed filters' gradient du [36, C, K]: G^T dU G, the transpose of
// f43_filters' product.
at::Tensor f43_filters_grad(const at::Tensor& du) {
  const int64_t c_in = du.size(1), k_out = du.size(2);
  at::Tensor taps = at::empty({9, c_in * k_out}, du.options());  // [3 x 3, C K]
  const SingleThreadedGemm gemm;
  if (!gemm.run_onednn('T', 'N', 9, c_in * k_out, 36, 1.0f, f43_kron().data_ptr<float>(), 9, du.data_ptr<float>(),
                       c_in * k_out, taps.data_ptr<float>(), c_in * k_out)) {
    at::mm_out(taps, f43_kron().t(), du.view({36, c_in * k_out}));
  }
  return taps.view({3, 3, c_in, k_out}).permute({3, 2, 0, 1}).contiguous();
}

// Inference: the transformed filters of each weight tensor, kept while the tensor lives and still holds the same
// memory (set_data, as Module::to does, swaps it) at the same version (bumped by every in-place change). Weak
// references: a dead tensor's entry is dropped, and neither its address nor its storage's can be reused by a new
// one while the entry holds them.
class FilterCache {
 public:
  at::Tensor get(const at::Tensor& w) {
    if (w.is_inference()) return f43_filters(w);  // no version counter
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.weight.expired(); }),
                   entries_.end());
    for (Entry& e : entries_) {
      if (e.weight._unsafe_get_target() != w.unsafeGetTensorImpl()) continue;
      if (e.storage._unsafe_get_target() != w.storage().unsafeGetStorageImpl() || e.data != w.data_ptr() ||
          e.version != w._version() || e.u.size(1) != w.size(1) || e.u.size(2) != w.size(0)) {
        e = make_entry(w);
      }
      return e.u;
    }
    if (entries_.size() >= 1024) entries_.clear();
    entries_.push_back(make_entry(w));
    return entries_.back().u;
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    int64_t version;
    at::Tensor u;
  };
  static Entry make_entry(const at::Tensor& w) {
    return Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(w.getIntrusivePtr()),
                 w.storage().getWeakStorageImpl(), w.data_ptr(), w._version(), f43_filters(w)};
  }
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

FilterCache& filter_cache() {
  static FilterCache* cache = new FilterCache();  // never destroyed: may be used during static destruction
  return *cache;
}

struct F43Conv3x3 : public torch::autograd::Function<F43Conv3x3> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w,
                            const at::Tensor& b) {
    const at::Tensor x = x_in.contiguous();
    save_conv3x3(ctx, x, w, b);
    return f43_forward(x, f43_filters(w), b);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto [x, w, gy, has_bias] = saved_conv3x3(ctx, grads);
    at::Tensor gx, gw, gb;
    // d/dx: the output's gradient convolved (stride 1, padding 1) with the filters flipped and transposed.
    if (ctx->needs_input_grad(0)) gx = f43_forward(gy, f43_filters(w.flip({2, 3}).transpose(0, 1)), at::Tensor());
    const bool want_w = ctx->needs_input_grad(1), want_b = has_bias && ctx->needs_input_grad(2);
    // d/dw: G^T (sum over tiles of V^T dM) G, the Winograd form of the correlation of input and output gradient.
    if (want_w) gw = f43_filters_grad(f43_filter_transform_grad(x, gy));
    if (want_b) gb = gy.sum({0, 2, 3});
    return {gx, gw, gb};
  }
};

}  // namespace

void save_conv3x3(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  ctx->save_for_backward({x, w});
  ctx->saved_data["bias"] = b.defined();
}

Conv3x3Saved saved_conv3x3(torch::autograd::AutogradContext* ctx, const std::vector<at::Tensor>& grads) {
  const auto saved = ctx->get_saved_variables();
  return Conv3x3Saved{saved[0], saved[1], grads[0].contiguous(), ctx->saved_data["bias"].toBool()};
}

bool f43_applies(const at::Tensor& x, const at::Tensor& w) {
  // Below 16 channels on either side (the U-Net's first and last convolutions) the products are too thin to win.
  return x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == at::kFloat &&
         w.scalar_type() == at::kFloat && x.layout() == at::kStrided && w.layout() == at::kStrided &&
         !autocast_active(c10::Device(c10::kCPU)) && x.dim() == 4 && w.dim() == 4 && w.size(2) == 3 &&
         w.size(3) == 3 && w.size(1) == x.size(1) && x.size(1) >= 16 && w.size(0) >= 16;
}

at::Tensor conv3x3_f43(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const bool record = autograd_records(x, w, b);
  // LibTorch 1.x's autograd functions take no undefined tensor: a missing bias is a zero one (its gradient unused).
  if (record) return F43Conv3x3::apply(x, w, b.defined() ? b : at::zeros({w.size(0)}, w.options().requires_grad(false)));
  at::NoGradGuard no_grad;
  return f43_forward(x.contiguous(), filter_cache().get(w), b);
}

}  // namespace nn_detail
}  // namespace diffuse
