// Whole-file reads and atomic writes (temp file in the same folder, fsync, rename, fsync of the folder).
//
//   diffuse::write_file_atomic("runs/fm/state.json", json.dump(2));
//   std::string bytes = diffuse::read_file("runs/fm/state.json");
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace diffuse {

// Reads a whole file; throws input_error naming the path when it is missing or unreadable.
std::string read_file(const std::string& path);
// Writes bytes to path so that a crash leaves either the old file or the new one, never a mix.
// A path that cannot be created (missing or unwritable folder, a file where a folder should be) is
// input_error (exit code 2); a write that fails on the way (full disk, file size limit) is run_error
// (exit code 1). Either way the old file is untouched and no temporary file is left.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Installs handlers for SIGINT, SIGTERM and SIGHUP (those not ignored) that remove the temporary files of
// every AtomicFileWriter in progress, then end the process by the same signal as before. For programs:
// without it, a terminated process leaves its half-written "name.tmp.PID.N" beside the output.
void remove_temporaries_on_signals();
// Marks a path this process is creating (a file, or a folder with everything in it) to be removed by those
// handlers; release() or the destructor unmarks it (once it is complete, renamed into place or removed).
class RemoveOnSignal {
 public:
  explicit RemoveOnSignal(const std::string& path);
  ~RemoveOnSignal();
  RemoveOnSignal(const RemoveOnSignal&) = delete;
  RemoveOnSignal& operator=(const RemoveOnSignal&) = delete;
  void release();

 private:
  int slot_ = -1;
};

// A file written in pieces and published atomically, for outputs too large to hold in memory:
//   diffuse::AtomicFileWriter f("samples.npy");  f.write(header);  f.write(batch...);  f.commit();
// Bytes go to a temporary file beside path; commit() flushes, fsyncs and renames it into place.
// Destroyed without commit() (an exception on the way), it removes the temporary file. Errors as above.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(const std::string& path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  void write(const void* data, size_t size);
  void write(const std::string& bytes) { write(bytes.data(), bytes.size()); }
  void commit();
  const std::string& path() const { return path_; }

 private:
  [[noreturn]] void fail(const std::string& what, int err);
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
  bool committed_ = false;
  std::optional<RemoveOnSignal> on_signal_;  // the temporary file, until it is renamed or removed
};
// Fills the folder path through fill(folder). A folder that does not exist yet is filled under a temporary
// name beside it and renamed into place when fill returns: an exception (removed here) or a terminating
// signal (with remove_temporaries_on_signals) leaves no partial folder. An existing folder is written into.
void write_folder(const std::string& path, const std::function<void(const std::string& folder)>& fill);
// CRC-32 (zlib's polynomial) of bytes as "crc32:" + 8 lowercase hex digits, for checksums in manifests.
std::string checksum_crc32(const std::string& bytes);
// The CRC-32 of data continued from crc (0 to start): crc32_update(crc32_update(0, a), b) is that of a then
// b.
uint32_t crc32_update(uint32_t crc, const void* data, size_t size);
// True when path exists (file or directory).
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
// Creates a directory and its parents (no error when it exists).
void make_directories(const std::string& path);
// Renames from to to (a file or a folder); run_error when it fails.
void rename_path(const std::string& from, const std::string& to);
// Removes a file or folder tree, ignoring errors (cleanup after a failure). Symbolic links are removed,
// never followed.
void remove_all_quietly(const std::string& path);
// path joined with name, with one '/' between.
std::string path_join(const std::string& dir, const std::string& name);
// The last component of a path ("runs/fm/" -> "fm"); "" for "/" or "".
std::string base_name(const std::string& path);

// One entry of a folder: its name and what it is (symbolic links are followed, as `stat` does).
struct DirEntry {
  std::string name;
  bool is_directory = false;
  bool is_regular = false;
  bool is_symlink = false;  // the entry itself is a symbolic link (lstat)
};
// The entries of a folder except "." and "..", sorted by name; input_error when it cannot be read.
// POSIX calls rather than std::filesystem: pip builds of LibTorch 2.x export their own (older) copies of
// libstdc++'s std::filesystem symbols, and a program linked against them crashes in remove_all and the
// directory iterators (pytorch/pytorch#133437).
std::vector<DirEntry> list_directory(const std::string& dir);

}  // namespace diffuse
