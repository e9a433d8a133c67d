// Whole-file reads and atomic writes (temp file in the same folder, fsync, rename, fsync of the folder).
//
//   diffuse::write_file_atomic("runs/fm/state.json", json.dump(2));
//   std::string bytes = diffuse::read_file("runs/fm/state.json");
#pragma once

#include <string>

namespace diffuse {

// Reads a whole file; throws input_error naming the path when it is missing or unreadable.
std::string read_file(const std::string& path);
// Writes bytes to path so that a crash leaves either the old file or the new one, never a mix.
// Throws run_error on any I/O failure (the old file is then untouched).
void write_file_atomic(const std::string& path, const std::string& bytes);
// True when path exists (file or directory).
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
// Creates a directory and its parents (no error when it exists).
void make_directories(const std::string& path);
// path joined with name, with one '/' between.
std::string path_join(const std::string& dir, const std::string& name);

}  // namespace diffuse
