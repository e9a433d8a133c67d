// Drawing images from a model: noise, a sigma grid, a sampler — batched, with per-image random streams
// so that the same seed gives the same images whatever the batch size or thread count.
//
//   diffuse::Model m = diffuse::load_model("runs/fm");
//   diffuse::GenerateOptions g; g.n = 64; g.sampler = "ddim"; g.steps = 50;
//   at::Tensor images = diffuse::generate(m, g);                  // float [-1, 1], [64, C, H, W], CPU
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"
#include "diffuse/sampler.h"

namespace diffuse {

struct GenerateOptions {
  int64_t n = 64;               // images to draw
  int64_t batch = 64;           // images per network batch (does not change the images)
  uint64_t seed = 0;            // image i draws its noise from (seed, i)
  int64_t first_index = 0;      // index of the first image (to continue a set)
  std::string sampler = "ddim"; // see `diffuse samplers`
  int64_t steps = 50;           // sampler steps
  std::string grid;             // sigma grid; empty: the sampler's default for the process
  double rho = 7.0;             // Karras grid
  SamplerOptions options;       // eta, churn, snr, rtol... (noise and callback are set per batch)
  std::vector<int64_t> labels;  // class per image (class-conditional models); empty: unconditional
  double guidance = 1.0;        // classifier-free guidance scale (1: plain conditional)
  bool cuda_graph = false;      // CUDA: each network evaluation replayed from a CUDA graph (one per batch shape,
                                // captured after two eager evaluations; diffuse::CudaGraphFunction)
};

// The sigma grid `generate` would use for this model and options.
std::vector<double> generation_sigmas(const Model& m, const GenerateOptions& g);

// Draws g.n images. on_batch(done, total) is called after each batch. Returns float [-1, 1] on CPU.
at::Tensor generate(const Model& m, const GenerateOptions& g,
                    const std::function<void(int64_t, int64_t)>& on_batch = nullptr,
                    int64_t* nfe_per_image = nullptr);

// Draws g.n images batch by batch and hands each batch to on_images(first, images) — images float
// [-1, 1] [b, C, H, W] on CPU, first the index of its first image within the g.n — keeping none:
// memory does not grow with g.n. The images are generate()'s.
void generate_batches(const Model& m, const GenerateOptions& g,
                      const std::function<void(int64_t, const at::Tensor&)>& on_images,
                      int64_t* nfe_per_image = nullptr);

// Writes uint8 images [N, C, H, W] as a .npy file (shape N, H, W[, C]), atomically.
void npy_save_uint8(const std::string& path, const at::Tensor& images);

// A .npy (N, H, W[, C]) or IDX (N, H, W; one channel) file of n uint8 images written batch by batch,
// published atomically when all n have come (finish()); abandoned (an exception), it leaves nothing.
//   diffuse::ImageArrayWriter w("s.npy", "npy", n, C, H, W);  w.append(batch_u8);  ...  w.finish();
class ImageArrayWriter {
 public:
  ImageArrayWriter(const std::string& path, const std::string& format, int64_t n, int64_t channels, int64_t height,
                   int64_t width);
  void append(const at::Tensor& images_u8);  // uint8 [b, C, H, W]
  void finish();

 private:
  AtomicFileWriter file_;
  int64_t n_, channels_, height_, width_, written_ = 0;
};

}  // namespace diffuse
