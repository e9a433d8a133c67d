#include "diffuse/io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "diffuse/common.h"

namespace diffuse {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

// The folder that holds path ("." for a bare name, "/" for a file in the root).
std::string parent_dir(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// fsync of a folder makes a rename in it durable (POSIX leaves it to the folder's own metadata).
// Returns 0 or an errno; EINVAL (a file system that cannot sync folders) counts as success.
int fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  int err = 0;
  if (::fsync(fd) != 0 && errno != EINVAL) err = errno;
  ::close(fd);
  return err;
}

}  // namespace

std::string read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw input_error(path + ": cannot open: " + errno_text(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw input_error(path + ": cannot stat: " + errno_text(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw input_error(path + ": is a directory, not a file");
  }
  std::string bytes;
  if (S_ISREG(st.st_mode) && st.st_size > 0) bytes.reserve(static_cast<size_t>(st.st_size));
  // Read until EOF rather than trusting st_size: pipes and /proc files report 0.
  char buffer[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      throw input_error(path + ": read failed: " + errno_text(err));
    }
    if (n == 0) break;
    bytes.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return bytes;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  static std::atomic<uint64_t> counter{0};
  const std::string tmp =
      path + ".tmp." + std::to_string(static_cast<long long>(::getpid())) + "." + std::to_string(counter++);

  // O_EXCL: never write through a stale temp file or a link someone planted under that name.
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw run_error(path + ": cannot create temporary file " + tmp + ": " + errno_text(errno));
  std::FILE* f = ::fdopen(fd, "wb");
  if (f == nullptr) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    throw run_error(path + ": fdopen failed: " + errno_text(err));
  }

  // Write, flush the stdio buffer, fsync the data, close; any failure removes the temp file.
  auto fail = [&](const std::string& what, int err, bool still_open) {
    if (still_open) std::fclose(f);
    ::unlink(tmp.c_str());
    throw run_error(path + ": " + what + ": " + errno_text(err));
  };
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size())
    fail("write failed", errno, true);
  if (std::fflush(f) != 0) fail("flush failed", errno, true);
  if (::fsync(::fileno(f)) != 0) fail("fsync failed", errno, true);
  if (std::fclose(f) != 0) fail("close failed", errno, false);

  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("rename from " + tmp + " failed", errno, false);
  int err = fsync_dir(parent_dir(path));
  if (err != 0) throw run_error(path + ": written, but fsync of its folder failed: " + errno_text(err));
}

bool path_exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

bool is_directory(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_directory(path, ec);
}

void make_directories(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) throw run_error(path + ": cannot create directory: " + ec.message());
  if (!is_directory(path)) throw run_error(path + ": exists and is not a directory");
}

std::string path_join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (name.empty()) return dir;
  size_t end = dir.find_last_not_of('/');
  std::string head = end == std::string::npos ? "" : dir.substr(0, end + 1);  // "/" -> ""
  size_t begin = name.find_first_not_of('/');
  std::string tail = begin == std::string::npos ? "" : name.substr(begin);
  return head + "/" + tail;
}

}  // namespace diffuse
