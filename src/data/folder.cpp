// Folders of images (PNG/JPEG/BMP), labelled by their first-level sub-folder.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cctype>
#include <exception>
#include <set>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

namespace diffuse {
namespace {

bool is_image_file(const std::string& name) {
  const std::string::size_type dot = name.find_last_of('.');
  if (dot == std::string::npos || dot == 0) return false;
  std::string ext = name.substr(dot);
  for (char& ch : ext) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp";
}

std::string size_string(const at::Tensor& image) {
  return std::to_string(image.size(2)) + "x" + std::to_string(image.size(1));  // width x height
}

struct FolderEntry {
  std::string path;   // as opened (dir joined with the relative path)
  std::string label;  // first-level sub-folder, empty for files directly in the root
};

// Walks dir/rel: image files go to `found` keyed by their relative path. Symbolic links to folders are not
// followed (no cycles); sub-folders that cannot be read are skipped, as permission-denied ones.
void walk(const std::string& dir, const std::string& rel, std::vector<std::pair<std::string, FolderEntry>>& found) {
  std::vector<DirEntry> entries;
  try {
    entries = list_directory(rel.empty() ? dir : path_join(dir, rel));
  } catch (const Error&) {
    if (rel.empty()) throw;
    return;
  }
  for (const DirEntry& e : entries) {
    const std::string r = rel.empty() ? e.name : rel + "/" + e.name;
    if (e.is_directory) {
      if (!e.is_symlink) walk(dir, r, found);
    } else if (e.is_regular && is_image_file(e.name)) {
      FolderEntry f;
      f.path = path_join(dir, r);
      const std::string::size_type slash = r.find('/');
      if (slash != std::string::npos) f.label = r.substr(0, slash);
      found.emplace_back(r, f);
    }
  }
}

// All image files under dir, recursively, sorted by relative path so that every run sees the same order.
std::vector<FolderEntry> list_images(const std::string& dir) {
  if (!is_directory(dir)) throw input_error(dir + ": not a directory");
  std::vector<std::pair<std::string, FolderEntry>> found;
  walk(dir, "", found);
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<FolderEntry> out;
  out.reserve(found.size());
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

}  // namespace

Dataset load_image_folder(const std::string& dir, const DataOptions& options) {
  if (options.channels != 0 && options.channels != 1 && options.channels != 3)
    throw input_error("--channels: must be 1 or 3, got " + std::to_string(options.channels));
  if (options.size < 0) throw input_error("--size: must be >= 0, got " + std::to_string(options.size));
  if (options.limit < 0) throw input_error("--limit: must be >= 0, got " + std::to_string(options.limit));
  std::vector<FolderEntry> files = list_images(dir);
  if (files.empty()) throw input_error(dir + ": no images (.png, .jpg, .jpeg, .bmp) in the folder");

  // Classes are the sorted first-level sub-folders that hold images; root files stay unlabelled.
  std::set<std::string> names;
  for (const FolderEntry& f : files)
    if (!f.label.empty()) names.insert(f.label);
  std::map<std::string, int64_t> class_index;
  for (const std::string& name : names) class_index.emplace(name, static_cast<int64_t>(class_index.size()));
  bool labelled = !names.empty();

  // Cut to the limit before decoding anything.
  if (options.limit > 0 && static_cast<int64_t>(files.size()) > options.limit) files.resize(options.limit);

  // The first file fixes the channel count (its own unless --channels says), then the rest decode (and
  // resize) on all threads, each into its own slot. A file that fails leaves its exception; the first in file
  // order is thrown, so the error does not depend on the thread count.
  const int64_t n = static_cast<int64_t>(files.size());
  std::vector<at::Tensor> images(files.size());
  std::vector<std::exception_ptr> errors(files.size());
  // With --size, a JPEG decodes at the smallest 1/2, 1/4 or 1/8 scale that still covers the size.
  images[0] = image_load(files[0].path, options.channels, options.size);
  const int64_t channels = images[0].size(0);
  if (options.size > 0) images[0] = resize_center_crop(images[0], options.size);
  at::parallel_for(1, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      try {
        at::Tensor image = image_load(files[i].path, channels, options.size);
        images[i] = options.size > 0 ? resize_center_crop(image, options.size) : image;
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  });
  std::vector<int64_t> labels;
  labels.reserve(files.size());
  for (int64_t i = 0; i < n; ++i) {
    if (errors[i]) std::rethrow_exception(errors[i]);
    const at::Tensor& image = images[i];
    if (image.size(1) != images[0].size(1) || image.size(2) != images[0].size(2)) {
      throw input_error(dir + ": mixed sizes: " + files[0].path + " is " + size_string(images[0]) + " but " +
                        files[i].path + " is " + size_string(image) + "; pass --size");
    }
    labels.push_back(!labelled ? 0 : files[i].label.empty() ? -1 : class_index.at(files[i].label));
  }

  Dataset ds;
  ds.images = at::stack(images, 0);
  ds.labels = at::tensor(labels, at::TensorOptions().dtype(at::kLong));
  if (labelled) {
    ds.num_classes = static_cast<int64_t>(names.size());
    ds.class_names.assign(names.begin(), names.end());
  }
  ds.source = "folder:" + dir;
  DataOptions rest = options;
  rest.limit = 0;
  apply_data_options(ds, rest);
  return ds;
}

}  // namespace diffuse
