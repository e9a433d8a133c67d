// Fréchet distance, KID, precision/recall, density/coverage between feature sets.
#include "diffuse/eval/metrics.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

#include "dgemm.h"
#include "diffuse/common.h"

namespace diffuse {
namespace {

void check_features(const at::Tensor& x, const char* what, int64_t min_rows) {
  if (!x.defined() || x.dim() != 2) throw input_error(std::string(what) + ": expected features [N, D]");
  if (x.size(0) < min_rows) {
    throw input_error(std::string(what) + ": needs at least " + std::to_string(min_rows) + " samples, got " +
                      std::to_string(x.size(0)));
  }
  if (x.size(1) < 1) throw input_error(std::string(what) + ": features have no dimensions");
  if (!at::isfinite(x).all().item<bool>()) throw input_error(std::string(what) + ": features contain NaN or Inf");
}

void check_pair(const at::Tensor& a, const at::Tensor& b, int64_t min_rows) {
  check_features(a, "real features", min_rows);
  check_features(b, "sample features", min_rows);
  if (a.size(1) != b.size(1)) {
    throw input_error("features: dimensions differ (" + std::to_string(a.size(1)) + " vs " + std::to_string(b.size(1)) + ")");
  }
}

at::Tensor symmetrize(const at::Tensor& a) { return (a + a.t()) * 0.5; }

// Squared distances between the rows of a [n, D] and b [m, D], float32 [n, m], clamped at 0.
at::Tensor squared_distances(const at::Tensor& a, const at::Tensor& a_sq, const at::Tensor& b, const at::Tensor& b_sq) {
  at::Tensor d2 = inner_products(a, b).mul_(-2.0f);
  d2.add_(a_sq.unsqueeze(1)).add_(b_sq.unsqueeze(0));
  return d2.clamp_min_(0.0f);
}

}  // namespace

FeatureStats feature_stats(const at::Tensor& features) {
  check_features(features, "features", 2);
  at::Tensor x = features.to(at::kDouble);
  at::Tensor mu = x.mean(0);
  at::Tensor xc = x - mu;
  at::Tensor cov = detail::gemm_tn_f64(xc, xc) / static_cast<double>(x.size(0) - 1);
  return {mu, cov};
}

at::Tensor sqrtm_psd(const at::Tensor& a) {
  if (!a.defined() || a.dim() != 2 || a.size(0) != a.size(1)) throw input_error("sqrtm: expected a square matrix");
  // A = V diag(w) V^T with w >= 0 up to rounding; tiny negative eigenvalues are rounding and clamp to 0.
  auto [w, v] = at::linalg_eigh(symmetrize(a.to(at::kDouble)));
  const at::Tensor scaled_t = (v * w.clamp_min(0.0).sqrt().unsqueeze(0)).t();  // (V diag(sqrt w))^T
  return detail::gemm_tn_f64(scaled_t, v.t());
}

double fd_from_stats(const at::Tensor& mu1, const at::Tensor& c1, const at::Tensor& mu2, const at::Tensor& c2) {
  if (mu1.dim() != 1 || mu2.dim() != 1 || mu1.size(0) != mu2.size(0)) throw input_error("fd: means must be vectors of one size");
  const int64_t d = mu1.size(0);
  for (const at::Tensor* c : {&c1, &c2}) {
    if (c->dim() != 2 || c->size(0) != d || c->size(1) != d) throw input_error("fd: covariances must be [D, D] with D = " + std::to_string(d));
  }
  at::Tensor m1 = mu1.to(at::kDouble), m2 = mu2.to(at::kDouble);
  at::Tensor s1 = symmetrize(c1.to(at::kDouble)), s2 = symmetrize(c2.to(at::kDouble));
  // Tr((C1 C2)^(1/2)) is the sum of the square roots of C1 C2's eigenvalues, which are those of the symmetric
  // F^T C2 F for any F with C1 = F F^T. F is C1's Cholesky factor when C1 is positive definite (as
  // covariances of more samples than features are), else C1^(1/2) (an eigendecomposition, the slower route).
  // C2 is symmetric: F^T C2 F = F^T (C2^T F).
  auto [chol, info] = at::linalg_cholesky_ex(s1);
  const at::Tensor f = info.item<int64_t>() == 0 ? chol : sqrtm_psd(s1);
  at::Tensor eig = at::linalg_eigvalsh(symmetrize(detail::gemm_tn_f64(f, detail::gemm_tn_f64(s2, f))));
  double tr_covmean = eig.clamp_min(0.0).sqrt().sum().item<double>();
  double mean_term = (m1 - m2).pow(2).sum().item<double>();
  double fd = mean_term + s1.trace().item<double>() + s2.trace().item<double>() - 2.0 * tr_covmean;
  return std::max(fd, 0.0);
}

double frechet_distance(const at::Tensor& features1, const at::Tensor& features2) {
  check_pair(features1, features2, 2);
  FeatureStats a = feature_stats(features1), b = feature_stats(features2);
  return fd_from_stats(a.mu, a.cov, b.mu, b.cov);
}

at::Tensor inner_products(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor af = a.to(at::kFloat).contiguous(), bf = b.to(at::kFloat).contiguous();
  if (!af.device().is_cpu() || af.size(0) == 0 || bf.size(0) == 0) return af.mm(bf.t());
  // a . b^T as a 1x1 convolution: b's rows are pixels of a 1 x M image, a's rows are the filters.
  const int64_t n = af.size(0), m = bf.size(0), d = af.size(1);
  at::Tensor input = bf.t().contiguous().view({1, d, 1, m});
  at::Tensor weight = af.view({n, d, 1, 1});
  return at::conv2d(input, weight).view({n, m});
}

KidResult kernel_inception_distance(const at::Tensor& real, const at::Tensor& fake, const KidOptions& options) {
  check_pair(real, fake, 2);
  if (options.subsets < 1) throw input_error("kid: subsets must be >= 1");
  const int64_t m = std::min({options.subset_size, real.size(0), fake.size(0)});
  if (m < 2) throw input_error("kid: subset size must be >= 2");
  const double d = static_cast<double>(real.size(1));
  at::Tensor x_all = real.to(at::kFloat).cpu(), y_all = fake.to(at::kFloat).cpu();
  at::Generator gen = at::detail::createCPUGenerator(options.seed);
  // k(x, y) = (x.y / d + 1)^3, summed in float64.
  auto kernel_sum = [&](const at::Tensor& a, const at::Tensor& b, bool drop_diagonal) {
    at::Tensor k = inner_products(a, b).mul_(static_cast<float>(1.0 / d)).add_(1.0f);
    k.mul_(k * k);
    double s = k.sum(at::kDouble).item<double>();
    if (drop_diagonal) s -= k.diagonal().sum(at::kDouble).item<double>();
    return s;
  };
  std::vector<double> values;
  values.reserve(static_cast<size_t>(options.subsets));
  for (int64_t s = 0; s < options.subsets; ++s) {
    at::Tensor ix = at::randperm(x_all.size(0), gen, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, m);
    at::Tensor iy = at::randperm(y_all.size(0), gen, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, m);
    at::Tensor x = x_all.index_select(0, ix), y = y_all.index_select(0, iy);
    // Unbiased MMD^2 (Gretton et al. 2012, eq. 3): off-diagonal within-set means minus twice the cross mean.
    const double md = static_cast<double>(m);
    double mmd = (kernel_sum(x, x, true) + kernel_sum(y, y, true)) / (md * (md - 1.0)) -
                 2.0 * kernel_sum(x, y, false) / (md * md);
    values.push_back(mmd);
  }
  KidResult r;
  for (double v : values) r.mean += v;
  r.mean /= static_cast<double>(values.size());
  for (double v : values) r.std += (v - r.mean) * (v - r.mean);
  r.std = std::sqrt(r.std / static_cast<double>(values.size()));
  return r;
}

namespace {

// Rows per distance block against `cols` columns: at most `chunk`, and few enough that a block holds at most
// 2^24 distances (64 MiB in float32), so the memory of k-NN and PRDC does not grow with the number of samples.
int64_t block_rows(int64_t chunk, int64_t cols) {
  constexpr int64_t kBlockElements = int64_t{1} << 24;
  return std::clamp<int64_t>(kBlockElements / std::max<int64_t>(cols, 1), 1, std::max<int64_t>(chunk, 1));
}

}  // namespace

at::Tensor knn_radii(const at::Tensor& x, const std::vector<int64_t>& ks, int64_t chunk) {
  if (ks.empty()) throw input_error("knn: no k given");
  const int64_t k_max = *std::max_element(ks.begin(), ks.end());
  if (*std::min_element(ks.begin(), ks.end()) < 1) throw input_error("knn: k must be >= 1");
  check_features(x, "features", k_max + 1);
  at::Tensor xf = x.to(at::kFloat).cpu();
  xf = xf - xf.mean(0);  // distances are shift-invariant; centering keeps float32 accurate
  at::Tensor sq = xf.pow(2).sum(1);
  const int64_t n = xf.size(0);
  at::Tensor radii = at::empty({static_cast<int64_t>(ks.size()), n}, at::kFloat);
  chunk = block_rows(chunk, n);
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t c = std::min(chunk, n - i0);
    at::Tensor d2 = squared_distances(xf.narrow(0, i0, c), sq.narrow(0, i0, c), xf, sq);
    // The k+1 smallest include the sample itself (distance 0): the k-th other neighbour is the last.
    at::Tensor nearest = std::get<0>(d2.topk(k_max + 1, 1, /*largest=*/false, /*sorted=*/true));
    for (size_t i = 0; i < ks.size(); ++i) radii[static_cast<int64_t>(i)].narrow(0, i0, c).copy_(nearest.select(1, ks[i]).sqrt());
  }
  return radii;
}

at::Tensor knn_radii(const at::Tensor& x, int64_t k, int64_t chunk) { return knn_radii(x, std::vector<int64_t>{k}, chunk)[0]; }

PrdcReference prdc_reference(const at::Tensor& real, const PrdcOptions& options) {
  if (options.k_pr < 1 || options.k_dc < 1) throw input_error("prdc: k must be >= 1");
  check_features(real, "real features", std::max(options.k_pr, options.k_dc) + 1);
  PrdcReference r;
  r.options = options;
  r.options.chunk = std::max<int64_t>(options.chunk, 1);
  r.features = real.to(at::kFloat).cpu();
  r.center = r.features.mean(0);
  r.features = r.features - r.center;
  r.sq_norms = r.features.pow(2).sum(1);
  at::Tensor radii = knn_radii(r.features, {options.k_pr, options.k_dc}, r.options.chunk).pow(2);
  r.radii2_pr = radii[0];
  r.radii2_dc = radii[1];
  return r;
}

PrdcResult prdc(const PrdcReference& ref, const at::Tensor& fake) {
  const PrdcOptions& options = ref.options;
  check_features(fake, "sample features", options.k_pr + 1);
  if (fake.size(1) != ref.features.size(1)) {
    throw input_error("features: dimensions differ (" + std::to_string(ref.features.size(1)) + " vs " + std::to_string(fake.size(1)) + ")");
  }
  at::Tensor ff = fake.to(at::kFloat).cpu() - ref.center;
  at::Tensor r_fake_pr = knn_radii(ff, options.k_pr, options.chunk).pow(2);
  at::Tensor fsq = ff.pow(2).sum(1);
  const int64_t n = ref.features.size(0), m = ff.size(0), chunk = block_rows(options.chunk, n);
  at::Tensor real_in_fake = at::zeros({n}, at::kBool);  // recall: real sample inside some fake ball
  at::Tensor real_covered = at::zeros({n}, at::kBool);  // coverage: real ball holding some fake sample
  int64_t fake_in_real = 0;                             // precision numerator
  double density_sum = 0.0;
  for (int64_t j0 = 0; j0 < m; j0 += chunk) {
    const int64_t c = std::min(chunk, m - j0);
    at::Tensor d2 = squared_distances(ff.narrow(0, j0, c), fsq.narrow(0, j0, c), ref.features, ref.sq_norms);  // [c, n]
    // Kynkäänniemi et al. 2019, eq. 1-2: a point is in a manifold when inside any of its k-NN balls.
    fake_in_real += d2.le(ref.radii2_pr.unsqueeze(0)).any(1).sum().item<int64_t>();
    real_in_fake.logical_or_(d2.le(r_fake_pr.narrow(0, j0, c).unsqueeze(1)).any(0));
    // Naeem et al. 2020, eq. 5-6: count real balls around each fake sample; a ball is covered if any.
    at::Tensor in_ball = d2.lt(ref.radii2_dc.unsqueeze(0));
    density_sum += static_cast<double>(in_ball.sum().item<int64_t>());
    real_covered.logical_or_(in_ball.any(0));
  }
  PrdcResult r;
  r.precision = static_cast<double>(fake_in_real) / static_cast<double>(m);
  r.recall = real_in_fake.to(at::kDouble).mean().item<double>();
  r.density = density_sum / (static_cast<double>(options.k_dc) * static_cast<double>(m));
  r.coverage = real_covered.to(at::kDouble).mean().item<double>();
  return r;
}

PrdcResult prdc(const at::Tensor& real, const at::Tensor& fake, const PrdcOptions& options) {
  check_pair(real, fake, 2);
  return prdc(prdc_reference(real, options), fake);
}

double histogram_entropy(const at::Tensor& counts) {
  at::Tensor c = counts.to(at::kDouble).flatten();
  double total = c.sum().item<double>();
  if (!(total > 0.0)) return 0.0;
  at::Tensor p = c / total;
  at::Tensor nz = p.masked_select(p > 0);
  return -(nz * nz.log()).sum().item<double>();
}

}  // namespace diffuse
