// Reference statistics files: pytorch-fid's .npz layout (mu, sigma), with diffuse's own checks beside them.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "diffuse/common.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/io/npy.h"

namespace diffuse {
namespace {

// Relative asymmetry a covariance may carry from its arithmetic (np.cov's product is not exactly symmetric).
constexpr double kSymmetryTolerance = 1e-6;

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i > 0 ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

at::Tensor float_array(const NpzArchive& z, const std::string& name) {
  at::Tensor t = npz_array(z, name);
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) {
    throw input_error(z.context + ": '" + name + "' is " + c10::toString(t.scalar_type()) +
                      "; expected float32 or float64");
  }
  if (!at::isfinite(t).all().item<bool>())
    throw input_error(z.context + ": '" + name + "' holds NaN or infinity");
  return t.to(at::kDouble);
}

std::vector<int64_t> int_array(const NpzArchive& z, const std::string& name) {
  at::Tensor t = npz_array(z, name);
  if (!at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    throw input_error(z.context + ": '" + name + "' is " + c10::toString(t.scalar_type()) +
                      "; expected integers");
  }
  at::Tensor v = t.to(at::kLong).reshape({-1});
  return {v.data_ptr<int64_t>(), v.data_ptr<int64_t>() + v.numel()};
}

std::string text_array(const NpzArchive& z, const std::string& name) {
  at::Tensor t = npz_array(z, name);
  if (t.scalar_type() != at::kByte || t.dim() != 1)
    throw input_error(z.context + ": '" + name + "' is not text (uint8 [n])");
  std::string s(reinterpret_cast<const char*>(t.data_ptr<uint8_t>()), t.numel());
  if (std::any_of(s.begin(), s.end(), [](char c) { return (c >= 0 && c < 0x20) || c == 0x7f; })) {
    throw input_error(z.context + ": '" + name + "' holds control characters");
  }
  return s;
}

at::Tensor text_tensor(const std::string& s) {
  at::Tensor t = at::empty({static_cast<int64_t>(s.size())}, at::kByte);
  if (!s.empty()) std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

}  // namespace

ReferenceStats reference_stats_load(const std::string& path) {
  const NpzArchive z = npz_load(path);
  for (const char* name : {"mu", "sigma"}) {
    if (!npz_has(z, name)) {
      throw input_error(path + ": no array '" + name +
                        "'; reference statistics hold 'mu' and 'sigma' (pytorch-fid's layout)");
    }
  }
  ReferenceStats rs;
  at::Tensor mu = float_array(z, "mu"), sigma = float_array(z, "sigma");
  if (mu.dim() != 1 || mu.size(0) == 0)
    throw input_error(path + ": 'mu' has shape " + shape_of(mu) + "; expected [D]");
  const int64_t d = mu.size(0);
  if (sigma.dim() != 2 || sigma.size(0) != d || sigma.size(1) != d) {
    throw input_error(path + ": 'sigma' has shape " + shape_of(sigma) + "; expected [" + std::to_string(d) +
                      ", " + std::to_string(d) + "] to go with 'mu'");
  }
  const double scale = sigma.abs().max().item<double>();
  if ((sigma - sigma.t()).abs().max().item<double>() > kSymmetryTolerance * scale) {
    throw input_error(path + ": 'sigma' is not symmetric, so not a covariance");
  }
  if (sigma.diagonal().min().item<double>() < 0)
    throw input_error(path + ": 'sigma' has a negative variance");
  rs.stats = {mu, sigma};
  if (npz_has(z, "count")) {
    std::vector<int64_t> count = int_array(z, "count");
    if (count.size() != 1 || count[0] < 2) throw input_error(path + ": 'count' must be one integer >= 2");
    rs.count = count[0];
  }
  if (npz_has(z, "image_shape")) {
    rs.image_shape = int_array(z, "image_shape");
    if (rs.image_shape.size() != 3 || *std::min_element(rs.image_shape.begin(), rs.image_shape.end()) < 1) {
      throw input_error(path + ": 'image_shape' must be three positive integers (C, H, W)");
    }
  }
  if (npz_has(z, "feature_network")) rs.feature_network = text_array(z, "feature_network");
  if (npz_has(z, "source")) rs.source = text_array(z, "source");
  return rs;
}

std::string reference_stats_serialize(const ReferenceStats& rs) {
  std::vector<std::pair<std::string, at::Tensor>> arrays = {{"mu", rs.stats.mu.to(at::kDouble)},
                                                            {"sigma", rs.stats.cov.to(at::kDouble)}};
  if (rs.count > 0) arrays.emplace_back("count", at::scalar_tensor(rs.count, at::kLong));
  if (!rs.image_shape.empty()) arrays.emplace_back("image_shape", at::tensor(rs.image_shape, at::kLong));
  if (!rs.feature_network.empty()) arrays.emplace_back("feature_network", text_tensor(rs.feature_network));
  if (!rs.source.empty()) arrays.emplace_back("source", text_tensor(rs.source));
  return npz_serialize(arrays);
}

}  // namespace diffuse
