#include "diffuse/io/file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "diffuse/common.h"

namespace diffuse {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

// Temporary outputs in progress (files, and folders being filled), readable from a signal handler: a fixed
// table of paths, each slot published (state kReady) only after its path is in place. A writer takes a slot
// when it creates its temporary output and frees it once that is renamed into place or removed.
constexpr int kPendingSlots = 64;
constexpr size_t kPendingPathMax = 4096;
enum : int { kFree = 0, kTaken = 1, kReady = 2 };
std::atomic<int> g_pending_state[kPendingSlots];
char g_pending_path[kPendingSlots][kPendingPathMax];
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler reads these");

// The slot now holding path, or -1 (table full or path too long: then only the writer removes it).
int pending_add(const std::string& path) {
  if (path.empty() || path.size() >= kPendingPathMax) return -1;
  for (int i = 0; i < kPendingSlots; ++i) {
    int expected = kFree;
    if (g_pending_state[i].compare_exchange_strong(expected, kTaken)) {
      std::memcpy(g_pending_path[i], path.c_str(), path.size() + 1);
      g_pending_state[i].store(kReady, std::memory_order_release);
      return i;
    }
  }
  return -1;
}

void pending_remove(int slot) {
  if (slot >= 0) g_pending_state[slot].store(kFree, std::memory_order_release);
}

// Removes name (relative to the folder parent_fd) and, for a folder, everything in it, with system calls only
// (openat, getdents64, unlinkat, close: async-signal-safe). Links are removed, never followed.
void remove_tree_signal_safe(int parent_fd, const char* name, int depth) {
  if (::unlinkat(parent_fd, name, 0) == 0 || errno == ENOENT) return;
  if (depth > 32) return;
  const int fd = ::openat(parent_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return;
  struct Dirent64 {
    uint64_t ino;
    int64_t off;
    unsigned short reclen;
    unsigned char type;
    char name[1];
  };
  alignas(8) char buf[4096];
  // Entries removed while listing may shift the listing: list again until a pass finds nothing.
  for (int pass = 0; pass < 8; ++pass) {
    bool removed = false;
    ::lseek(fd, 0, SEEK_SET);
    for (;;) {
      const long n = ::syscall(SYS_getdents64, fd, buf, sizeof(buf));
      if (n <= 0) break;
      for (long at = 0; at < n;) {
        const Dirent64* d = reinterpret_cast<const Dirent64*>(buf + at);
        at += d->reclen;
        const char* e = d->name;
        if (e[0] == '.' && (e[1] == '\0' || (e[1] == '.' && e[2] == '\0'))) continue;
        remove_tree_signal_safe(fd, e, depth + 1);
        removed = true;
      }
    }
    if (!removed) break;
  }
  ::close(fd);
  ::unlinkat(parent_fd, name, AT_REMOVEDIR);
}

void remove_pending_and_reraise(int sig) {
  for (int i = 0; i < kPendingSlots; ++i) {
    if (g_pending_state[i].load(std::memory_order_acquire) == kReady) {
      remove_tree_signal_safe(AT_FDCWD, g_pending_path[i], 0);
    }
  }
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(sig, &dfl, nullptr);
  ::raise(sig);
}

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

AtomicFileWriter::AtomicFileWriter(const std::string& path) : path_(path) {
  static std::atomic<uint64_t> counter{0};
  tmp_ = path + ".tmp." + std::to_string(static_cast<long long>(::getpid())) + "." + std::to_string(counter++);
  // Registered for removal on a signal before it is created, so that no moment leaves it behind.
  on_signal_.emplace(tmp_);
  // O_EXCL: never write through a stale temp file or a link someone planted under that name.
  int fd = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) {
    const int err = errno;
    // The output's place is missing, not a folder, read-only or not ours: the path given is at fault.
    if (err == ENOENT || err == ENOTDIR || err == EACCES || err == EPERM || err == EROFS || err == EISDIR ||
        err == ENAMETOOLONG || err == ELOOP) {
      throw input_error(path + ": cannot be written: " + errno_text(err));
    }
    throw run_error(path + ": cannot create temporary file " + tmp_ + ": " + errno_text(err));
  }
  f_ = ::fdopen(fd, "wb");
  if (f_ == nullptr) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp_.c_str());
    throw run_error(path + ": fdopen failed: " + errno_text(err));
  }
}

AtomicFileWriter::~AtomicFileWriter() {
  if (committed_) return;
  if (f_) std::fclose(f_);
  ::unlink(tmp_.c_str());
}

void AtomicFileWriter::fail(const std::string& what, int err) {
  if (f_) std::fclose(f_);
  f_ = nullptr;
  ::unlink(tmp_.c_str());
  on_signal_.reset();
  committed_ = true;  // nothing left to clean up
  throw run_error(path_ + ": " + what + ": " + errno_text(err));
}

void AtomicFileWriter::write(const void* data, size_t size) {
  if (!f_) throw run_error(path_ + ": write after commit");
  if (size > 0 && std::fwrite(data, 1, size, f_) != size) fail("write failed", errno);
}

void AtomicFileWriter::commit() {
  if (!f_) throw run_error(path_ + ": committed twice");
  // Flush the stdio buffer, fsync the data, close, rename; any failure removes the temp file.
  if (std::fflush(f_) != 0) fail("flush failed", errno);
  if (::fsync(::fileno(f_)) != 0) fail("fsync failed", errno);
  const int closed = std::fclose(f_);
  f_ = nullptr;
  if (closed != 0) fail("close failed", errno);
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    if (err == EISDIR || err == ENOTEMPTY || err == EEXIST) {
      ::unlink(tmp_.c_str());
      on_signal_.reset();
      committed_ = true;
      throw input_error(path_ + ": cannot be written: it is a directory");
    }
    fail("rename from " + tmp_ + " failed", err);
  }
  committed_ = true;
  on_signal_.reset();
  int err = fsync_dir(parent_dir(path_));
  if (err != 0) throw run_error(path_ + ": written, but fsync of its folder failed: " + errno_text(err));
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  AtomicFileWriter f(path);
  f.write(bytes);
  f.commit();
}

uint32_t crc32_update(uint32_t crc, const void* data, size_t size) {
  uLong c = crc;
  const auto* p = static_cast<const Bytef*>(data);
  while (size > 0) {  // zlib takes uInt lengths: feed files over 4 GiB in pieces
    const uInt n = static_cast<uInt>(std::min<size_t>(size, 1u << 30));
    c = ::crc32(c, p, n);
    p += n;
    size -= n;
  }
  return static_cast<uint32_t>(c & 0xffffffffUL);
}

std::string checksum_crc32(const std::string& bytes) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%08lx",
                static_cast<unsigned long>(crc32_update(0, bytes.data(), bytes.size())));
  return std::string("crc32:") + buf;
}

bool path_exists(const std::string& path) {
  struct stat st;
  return !path.empty() && ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st;
  return !path.empty() && ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void make_directories(const std::string& path) {
  if (path.empty()) throw input_error("cannot create a directory with an empty name");
  // Each prefix ending before a '/', then the whole path: mkdir, and EEXIST is fine when it is a folder.
  std::string::size_type pos = 0;
  while (true) {
    pos = path.find('/', pos + 1);
    const std::string part = pos == std::string::npos ? path : path.substr(0, pos);
    if (!part.empty() && part.back() != '/' && ::mkdir(part.c_str(), 0777) != 0 && errno != EEXIST) {
      const int err = errno;
      if (err == ENOSPC || err == EDQUOT || err == EIO) throw run_error(path + ": cannot create directory: " + errno_text(err));
      throw input_error(path + ": cannot create directory: " + errno_text(err));  // the path given is at fault
    }
    if (pos == std::string::npos) break;
  }
  if (!is_directory(path)) throw input_error(path + ": exists and is not a directory");
}

void rename_path(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0) {
    throw run_error(to + ": cannot rename " + from + " into place: " + errno_text(errno));
  }
}

namespace {
// The names in a folder except "." and ".."; false when it cannot be opened (errno set).
bool read_names(const std::string& dir, std::vector<std::string>& names) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return false;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  return true;
}
}  // namespace

void remove_all_quietly(const std::string& path) {
  struct stat st;
  if (path.empty() || ::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    std::vector<std::string> names;
    read_names(path, names);
    for (const std::string& n : names) remove_all_quietly(path_join(path, n));
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

std::vector<DirEntry> list_directory(const std::string& dir) {
  std::vector<std::string> names;
  if (!read_names(dir, names)) throw input_error(dir + ": cannot list the folder (" + errno_text(errno) + ")");
  std::sort(names.begin(), names.end());
  std::vector<DirEntry> out;
  out.reserve(names.size());
  for (std::string& n : names) {
    DirEntry entry;
    const std::string path = path_join(dir, n);
    entry.name = std::move(n);
    // lstat first; a symbolic link is stat'ed again for what it points to.
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0) {
      entry.is_symlink = S_ISLNK(st.st_mode);
      if (!entry.is_symlink || ::stat(path.c_str(), &st) == 0) {
        entry.is_directory = S_ISDIR(st.st_mode);
        entry.is_regular = S_ISREG(st.st_mode);
      }
    }
    out.push_back(std::move(entry));
  }
  return out;
}

std::string base_name(const std::string& path) {
  const std::string::size_type end = path.find_last_not_of('/');
  if (end == std::string::npos) return "";
  const std::string::size_type slash = path.find_last_of('/', end);
  const std::string::size_type begin = slash == std::string::npos ? 0 : slash + 1;
  return path.substr(begin, end - begin + 1);
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

RemoveOnSignal::RemoveOnSignal(const std::string& path) : slot_(pending_add(path)) {}
RemoveOnSignal::~RemoveOnSignal() { release(); }
void RemoveOnSignal::release() {
  pending_remove(slot_);
  slot_ = -1;
}

void write_folder(const std::string& path, const std::function<void(const std::string&)>& fill) {
  if (path_exists(path)) {
    if (!is_directory(path)) throw input_error(path + ": exists and is not a directory");
    fill(path);
    return;
  }
  const std::string tmp = path + ".tmp." + std::to_string(static_cast<long long>(::getpid()));
  remove_all_quietly(tmp);  // a leftover of an earlier process with this pid
  // Registered before it exists: a signal between the two would otherwise leave the new folder behind.
  RemoveOnSignal guard(tmp);
  make_directories(tmp);
  try {
    fill(tmp);
    rename_path(tmp, path);
  } catch (...) {
    remove_all_quietly(tmp);
    throw;
  }
}

void remove_temporaries_on_signals() {
  struct sigaction sa {};
  sa.sa_handler = remove_pending_and_reraise;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction old {};
    // A signal the caller ignores (nohup's SIGHUP) stays ignored.
    if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    ::sigaction(sig, &sa, nullptr);
  }
}

}  // namespace diffuse
