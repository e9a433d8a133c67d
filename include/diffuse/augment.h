// Synthetic labelled data from a class-conditional model, for training other models (data augmentation).
//
//   diffuse::Model m = diffuse::load_model("runs/fm-cond");
//   diffuse::GenerateOptions g; g.sampler = "ddim"; g.steps = 50; g.guidance = 2.0;
//   diffuse::Dataset syn = diffuse::synthesize_dataset(m, /*per_class=*/100, g);
//   diffuse::save_labelled_dataset(syn, "synthetic/", "png");   // synthetic/<class>/000001.png
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "diffuse/data/dataset.h"
#include "diffuse/generate.h"

namespace diffuse {

// per_class images of every class of a class-conditional model, class by class: image i of class c draws
// from (g.seed, c * per_class + i). g.n and g.labels are set here; the rest of g (sampler, steps, guidance,
// batch) is used as given. on_batch(done, total) reports progress. input_error for an unconditional model.
// Class names are the indices, zero-padded to the width of the largest ("0".."9", or "00".."99").
Dataset synthesize_dataset(const Model& m, int64_t per_class, GenerateOptions g,
                           const std::function<void(int64_t, int64_t)>& on_batch = nullptr);

// Writes a labelled set: "png" -> dir/<class name>/NNNNNN.png (numbered from 1 within the set; reads back
// with load_dataset("folder:dir")), "idx" -> dir/images-idx3-ubyte and dir/labels-idx1-ubyte (1 channel,
// at most 256 classes; reads back with load_dataset("idx:dir/images-idx3-ubyte,dir/labels-idx1-ubyte")).
void save_labelled_dataset(const Dataset& ds, const std::string& dir, const std::string& format);

// Concatenates two labelled sets of the same channels (b is resized to a's size when they differ).
Dataset concat_datasets(const Dataset& a, const Dataset& b);

}  // namespace diffuse
