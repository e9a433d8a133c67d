// Sample-quality metrics between two sets of features (rows are samples): Fréchet distance, KID,
// precision/recall and density/coverage. Features come from a feature network (eval/classifier.h).
//
//   at::Tensor real = clf.features(ref_images), fake = clf.features(samples);   // [N, D], [M, D]
//   double fd = diffuse::frechet_distance(real, fake);
//   diffuse::KidResult kid = diffuse::kernel_inception_distance(real, fake);
//   diffuse::PrdcResult p = diffuse::prdc(real, fake);
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace diffuse {

// Mean [D] and covariance [D, D] (unbiased, divides by N - 1) of features [N, D], in float64.
struct FeatureStats {
  at::Tensor mu;
  at::Tensor cov;
};
FeatureStats feature_stats(const at::Tensor& features);

// Square root of a symmetric positive semi-definite matrix (float64 result), through the symmetric
// eigendecomposition A = V diag(w) V^T -> V diag(sqrt(max(w, 0))) V^T. The input is symmetrized first.
at::Tensor sqrtm_psd(const at::Tensor& a);

// Fréchet distance between N(mu1, C1) and N(mu2, C2) (Dowson & Landau 1982; Heusel et al. 2017):
//   |mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)),
// with Tr((C1 C2)^(1/2)) = Tr((C1^(1/2) C2 C1^(1/2))^(1/2)), whose argument is symmetric PSD.
double fd_from_stats(const at::Tensor& mu1, const at::Tensor& c1, const at::Tensor& mu2, const at::Tensor& c2);
// FD between the Gaussians fitted to two feature sets (each needs at least 2 rows, same D).
double frechet_distance(const at::Tensor& features1, const at::Tensor& features2);

// Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with the kernel
// k(x, y) = (x.y / D + 1)^3, averaged over random subsets of both sets.
struct KidOptions {
  int64_t subsets = 100;       // number of subset pairs
  int64_t subset_size = 1000;  // capped at the smaller set's size (at least 2)
  uint64_t seed = 0;           // subset draws
};
struct KidResult {
  double mean = 0.0;  // mean MMD^2 over subsets
  double std = 0.0;   // its standard deviation over subsets
};
KidResult kernel_inception_distance(const at::Tensor& real, const at::Tensor& fake, const KidOptions& options = {});

// Precision/recall with k-NN manifolds (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).
// Radii are the distance to the k-th nearest other sample of the same set. Distances are computed in row
// blocks of at most `chunk` rows and 2^24 entries (64 MiB), so memory does not grow with the sample count.
struct PrdcOptions {
  int64_t k_pr = 3;      // neighbours for the precision/recall manifolds
  int64_t k_dc = 5;      // neighbours for density/coverage (real balls only)
  int64_t chunk = 1024;  // rows per distance block
};
struct PrdcResult {
  double precision = 0.0;  // fraction of fake samples inside the real manifold
  double recall = 0.0;     // fraction of real samples inside the fake manifold
  double density = 0.0;    // mean number of real balls around each fake sample, / k (can exceed 1)
  double coverage = 0.0;   // fraction of real balls that contain at least one fake sample
};
PrdcResult prdc(const at::Tensor& real, const at::Tensor& fake, const PrdcOptions& options = {});

// The real side of prdc (centred features and squared k-NN radii), computed once and reused for
// several sample sets.
struct PrdcReference {
  PrdcOptions options;
  at::Tensor center;     // mean of the real features
  at::Tensor features;   // float32 [N, D], centred
  at::Tensor sq_norms;   // [N]
  at::Tensor radii2_pr;  // squared k_pr-NN radii [N]
  at::Tensor radii2_dc;  // squared k_dc-NN radii [N]
};
PrdcReference prdc_reference(const at::Tensor& real, const PrdcOptions& options = {});
PrdcResult prdc(const PrdcReference& ref, const at::Tensor& fake);

// Distance from each row of x to its k-th nearest other row of x (row chunks), float32 [N]. Needs N > k.
at::Tensor knn_radii(const at::Tensor& x, int64_t k, int64_t chunk = 1024);
// The same for several k in one pass over the distances: [ks.size(), N].
at::Tensor knn_radii(const at::Tensor& x, const std::vector<int64_t>& ks, int64_t chunk = 1024);

// a [N, D] times b [M, D]^T in float32 -> [N, M]. On CPU it runs as a 1x1 convolution (oneDNN), several
// times faster than the reference BLAS behind at::mm in Debian's LibTorch.
at::Tensor inner_products(const at::Tensor& a, const at::Tensor& b);

// Entropy in nats of a histogram of counts (0 for an empty histogram).
double histogram_entropy(const at::Tensor& counts);

}  // namespace diffuse
