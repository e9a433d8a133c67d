// `diffuse augment`: a labelled synthetic data set drawn class by class from a class-conditional model.
#include "diffuse/augment.h"

#include <cstdio>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

namespace diffuse {

Dataset synthesize_dataset(const Model& m, int64_t per_class, GenerateOptions g,
                           const std::function<void(int64_t, int64_t)>& on_batch) {
  if (!m.class_conditional()) throw input_error("augment needs a class-conditional model (train with --class-cond)");
  if (per_class < 1) throw input_error("--per-class must be at least 1");
  const int64_t K = m.num_classes();
  g.n = K * per_class;
  g.first_index = 0;
  g.labels.clear();
  for (int64_t c = 0; c < K; ++c) g.labels.insert(g.labels.end(), per_class, c);
  Dataset ds;
  ds.images = to_uint8(generate(m, g, on_batch));
  ds.labels = at::tensor(g.labels, at::kLong);
  ds.num_classes = K;
  const int width = static_cast<int>(std::to_string(K - 1).size());
  for (int64_t c = 0; c < K; ++c) {
    char name[32];
    std::snprintf(name, sizeof(name), "%0*lld", width, static_cast<long long>(c));
    ds.class_names.push_back(name);
  }
  ds.source = "synthetic:" + m.source;
  return ds;
}

namespace {
void save_labelled_files(const Dataset& ds, const std::string& dir, const std::string& format) {
  if (format == "png") {
    std::vector<int64_t> counter(static_cast<size_t>(std::max<int64_t>(ds.num_classes, 1)), 0);
    for (int64_t i = 0; i < ds.size(); ++i) {
      const int64_t c = ds.labels[i].item<int64_t>();
      if (c < 0 || c >= static_cast<int64_t>(ds.class_names.size())) throw input_error("augment: label without a class name");
      const std::string class_dir = path_join(dir, ds.class_names[static_cast<size_t>(c)]);
      if (counter[static_cast<size_t>(c)] == 0) make_directories(class_dir);
      char name[32];
      std::snprintf(name, sizeof(name), "%06lld.png", static_cast<long long>(++counter[static_cast<size_t>(c)]));
      image_save_png(path_join(class_dir, name), ds.images[i]);
    }
  } else if (format == "idx") {
    if (ds.channels() != 1) {
      throw input_error("--format idx writes single-channel images; these have " + std::to_string(ds.channels()) + " (use png)");
    }
    if (ds.num_classes > 256) throw input_error("--format idx holds at most 256 classes");
    idx_save(path_join(dir, "images-idx3-ubyte"), ds.images.squeeze(1).contiguous());
    idx_save(path_join(dir, "labels-idx1-ubyte"), ds.labels.to(at::kByte).contiguous());
  } else {
    throw input_error("--format: unknown '" + format + "' (png, idx)");
  }
}
}  // namespace

void save_labelled_dataset(const Dataset& ds, const std::string& dir, const std::string& format) {
  if (ds.size() == 0) throw input_error("augment: nothing to write");
  // A new folder appears whole or not at all (write_folder); an existing one is added to.
  write_folder(dir, [&](const std::string& folder) { save_labelled_files(ds, folder, format); });
}

Dataset concat_datasets(const Dataset& a, const Dataset& b) {
  if (a.size() == 0) return b;
  if (b.size() == 0) return a;
  if (a.channels() != b.channels()) throw input_error("concat: data sets with different channel counts");
  if (a.height() != a.width()) throw input_error("concat: the first data set must be square");
  Dataset out = a;
  const at::Tensor bi = b.height() == a.height() && b.width() == a.width() ? b.images : resize_center_crop_batch(b.images, a.height());
  out.images = at::cat({a.images, bi}, 0);
  out.labels = at::cat({a.labels, b.labels}, 0);
  out.num_classes = std::max(a.num_classes, b.num_classes);
  if (b.class_names.size() > out.class_names.size()) out.class_names = b.class_names;
  out.source = a.source + "+" + b.source;
  return out;
}

}  // namespace diffuse
