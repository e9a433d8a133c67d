// Per-image random streams: image i draws from its own CPU generator seeded from (seed, i).
#include "diffuse/sampler.h"

#include "diffuse/common.h"

#include <ATen/CPUGeneratorImpl.h>

namespace diffuse {

namespace {

// SplitMix64 finalizer (Steele et al. 2014): a bijective mix, so nearby (seed, index) pairs give
// unrelated generator seeds.
uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

Noise::Noise(uint64_t seed, int64_t first_index, int64_t count) {
  if (count < 0 || first_index < 0) throw input_error("noise: negative image index or count");
  const uint64_t base = splitmix64(seed);
  generators_.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    generators_.push_back(at::make_generator<at::CPUGeneratorImpl>(
        splitmix64(base + static_cast<uint64_t>(first_index + i))));
}

at::Tensor Noise::randn(const std::vector<int64_t>& per_image_shape) {
  std::vector<at::Tensor> draws;
  draws.reserve(generators_.size());
  const auto options = at::TensorOptions().dtype(at::kFloat);
  for (at::Generator& gen : generators_) draws.push_back(at::randn(per_image_shape, gen, options));
  if (draws.empty()) {
    std::vector<int64_t> shape = {0};
    shape.insert(shape.end(), per_image_shape.begin(), per_image_shape.end());
    return at::empty(shape, options);
  }
  return at::stack(draws);
}

at::Tensor Noise::randn_like(const at::Tensor& x) {
  if (!x.defined() || x.dim() < 1 || x.size(0) != count())
    throw input_error("noise: a batch of " + std::to_string(x.defined() && x.dim() > 0 ? x.size(0) : 0) +
                      " images needs as many noise streams, have " + std::to_string(count()));
  const std::vector<int64_t> shape(x.sizes().begin() + 1, x.sizes().end());
  return randn(shape).to(x.device(), x.scalar_type());
}

}  // namespace diffuse
