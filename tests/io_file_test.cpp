// Whole-file reads, atomic writes and path helpers.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

// A fresh, empty folder per test, removed afterwards.
class FileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        (diffuse_test::temp_root() / ("diffuse_io_file_" + std::to_string(::getpid()) + "_" + info->name()))
            .string();
    diffuse_test::remove_tree(dir_);
    diffuse_test::make_dirs(dir_);
  }
  void TearDown() override { diffuse_test::remove_tree(dir_); }

  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  std::string dir_;
};

TEST_F(FileTest, WriteThenReadRoundTripsBinaryBytes) {
  std::string bytes("a\0b\xff\n", 5);
  bytes += std::string(200000, 'x');  // more than one read() chunk
  const std::string path = diffuse::path_join(dir_, "blob.bin");
  diffuse::write_file_atomic(path, bytes);
  EXPECT_EQ(diffuse::read_file(path), bytes);
  EXPECT_EQ(entries(), std::vector<std::string>{"blob.bin"});
}

TEST_F(FileTest, WriteReplacesContentAndLeavesNoTempFiles) {
  const std::string path = diffuse::path_join(dir_, "state.json");
  diffuse::write_file_atomic(path, "first version, longer than the second");
  diffuse::write_file_atomic(path, "second");
  EXPECT_EQ(diffuse::read_file(path), "second");
  diffuse::write_file_atomic(path, "");
  EXPECT_EQ(diffuse::read_file(path), "");
  EXPECT_EQ(fs::file_size(path), 0u);
  EXPECT_EQ(entries(), std::vector<std::string>{"state.json"});
}

TEST_F(FileTest, WriteIntoMissingDirectoryIsBadInputAndCreatesNothing) {
  const std::string missing = diffuse::path_join(dir_, "no/such/dir");
  const std::string path = diffuse::path_join(missing, "out.bin");
  try {
    diffuse::write_file_atomic(path, "data");
    FAIL() << "expected an error";
  } catch (const diffuse::Error& e) {
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);  // the output path given is at fault
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_FALSE(diffuse::path_exists(missing));
  EXPECT_TRUE(entries().empty());
}

TEST_F(FileTest, FailedRenameLeavesTargetUntouchedAndRemovesTemp) {
  // A directory in the way: the temp file is written, the rename over it fails.
  const std::string path = diffuse::path_join(dir_, "target");
  diffuse::make_directories(path);
  diffuse::write_file_atomic(diffuse::path_join(path, "inside.txt"), "keep me");
  EXPECT_THROW(diffuse::write_file_atomic(path, "new bytes"), diffuse::Error);
  EXPECT_TRUE(diffuse::is_directory(path));
  EXPECT_EQ(diffuse::read_file(diffuse::path_join(path, "inside.txt")), "keep me");
  EXPECT_EQ(entries(), std::vector<std::string>{"target"});
}

TEST_F(FileTest, WriteThatHitsTheFileSizeLimitIsARunFailureAndLeavesNothing) {
  // ulimit -f: the write fails with EFBIG (SIGXFSZ ignored, as the program does) like a full disk would.
  struct sigaction ignore {}, old_action {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(sigaction(SIGXFSZ, &ignore, &old_action), 0);
  struct rlimit old_limit {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  struct rlimit small = old_limit;
  small.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string path = diffuse::path_join(dir_, "big.bin");
  int code = -1;
  try {
    diffuse::write_file_atomic(path, std::string(1 << 20, 'x'));
  } catch (const diffuse::Error& e) {
    code = e.exit_code();
  }
  setrlimit(RLIMIT_FSIZE, &old_limit);
  sigaction(SIGXFSZ, &old_action, nullptr);
  EXPECT_EQ(code, diffuse::kExitFailure);
  EXPECT_TRUE(entries().empty());
}

TEST_F(FileTest, AtomicFileWriterPublishesOnCommitOnly) {
  const std::string path = diffuse::path_join(dir_, "streamed.bin");
  {
    diffuse::AtomicFileWriter f(path);
    f.write("abc");
    f.write(std::string("def"));
    EXPECT_FALSE(diffuse::path_exists(path));
    EXPECT_EQ(entries().size(), 1u);  // the temporary file
  }  // abandoned: no file, no temporary
  EXPECT_TRUE(entries().empty());
  diffuse::AtomicFileWriter f(path);
  f.write("abc");
  f.write("def", 3);
  f.commit();
  EXPECT_EQ(diffuse::read_file(path), "abcdef");
  EXPECT_EQ(entries(), std::vector<std::string>{"streamed.bin"});
  EXPECT_EQ(diffuse::checksum_crc32("123456789"), "crc32:cbf43926");  // the CRC-32 check value
}

TEST_F(FileTest, ReadErrorsAreInputErrorsNamingThePath) {
  const std::string missing = diffuse::path_join(dir_, "missing.txt");
  try {
    diffuse::read_file(missing);
    FAIL() << "expected an error";
  } catch (const diffuse::Error& e) {
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);
    EXPECT_EQ(std::string(e.what()).rfind(missing, 0), 0u) << e.what();
  }
  try {
    diffuse::read_file(dir_);
    FAIL() << "expected an error";
  } catch (const diffuse::Error& e) {
    EXPECT_NE(std::string(e.what()).find("directory"), std::string::npos) << e.what();
  }
}

TEST_F(FileTest, DirectoriesAndExistence) {
  const std::string nested = diffuse::path_join(dir_, "a/b/c");
  EXPECT_FALSE(diffuse::path_exists(nested));
  diffuse::make_directories(nested);
  diffuse::make_directories(nested);  // exists already: no error
  EXPECT_TRUE(diffuse::path_exists(nested));
  EXPECT_TRUE(diffuse::is_directory(nested));
  const std::string file = diffuse::path_join(nested, "f");
  diffuse::write_file_atomic(file, "x");
  EXPECT_TRUE(diffuse::path_exists(file));
  EXPECT_FALSE(diffuse::is_directory(file));
  // A file where a folder should go.
  EXPECT_THROW(diffuse::make_directories(diffuse::path_join(file, "sub")), diffuse::Error);
  EXPECT_THROW(diffuse::make_directories(file), diffuse::Error);
}

TEST_F(FileTest, WriteFolderAppearsWholeOrNotAtAll) {
  const std::string out = dir_ + "/out";
  diffuse::write_folder(out, [](const std::string& d) {
    diffuse::write_file_atomic(d + "/a.txt", "a");
    diffuse::write_file_atomic(d + "/b.txt", "b");
  });
  EXPECT_EQ(entries(), std::vector<std::string>{"out"});
  EXPECT_EQ(diffuse::read_file(out + "/b.txt"), "b");
  // A failure half-way: the new folder never appears, its temporary is gone.
  EXPECT_THROW(diffuse::write_folder(dir_ + "/out2",
                                     [](const std::string& d) {
                                       diffuse::write_file_atomic(d + "/a.txt", "a");
                                       throw diffuse::run_error("disk full");
                                     }),
               diffuse::Error);
  EXPECT_EQ(entries(), std::vector<std::string>{"out"});
  // An existing folder is written into; a file in the way is bad input.
  diffuse::write_folder(out, [](const std::string& d) { diffuse::write_file_atomic(d + "/c.txt", "c"); });
  EXPECT_EQ(diffuse::read_file(out + "/c.txt"), "c");
  try {
    diffuse::write_folder(out + "/a.txt", [](const std::string&) {});
    ADD_FAILURE() << "no error for a file in the way";
  } catch (const diffuse::Error& e) {
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);
  }
}

// A process ended by SIGTERM while it writes a file in pieces and fills a new folder (with a sub-folder)
// leaves neither behind, and still ends by SIGTERM.
TEST_F(FileTest, TerminatingSignalRemovesTemporaryOutputs) {
  const std::string dir = dir_;
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    diffuse::remove_temporaries_on_signals();
    diffuse::AtomicFileWriter f(dir + "/big.npy");
    f.write(std::string(1 << 16, 'x'));
    diffuse::write_folder(dir + "/pngs", [&](const std::string& d) {
      diffuse::write_file_atomic(d + "/000000.png", "png");
      diffuse::make_directories(d + "/class0/deeper");
      diffuse::write_file_atomic(d + "/class0/deeper/000001.png", "png");
      diffuse::AtomicFileWriter half(d + "/class0/000002.png");
      half.write("half");
      ::raise(SIGTERM);
      ::_exit(3);  // not reached
    });
    ::_exit(4);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "status " << status;
  EXPECT_TRUE(entries().empty()) << "left: " << (entries().empty() ? "" : entries().front());
}

TEST(PathJoin, PutsExactlyOneSlashBetween) {
  EXPECT_EQ(diffuse::path_join("runs", "model.safetensors"), "runs/model.safetensors");
  EXPECT_EQ(diffuse::path_join("runs/", "x"), "runs/x");
  EXPECT_EQ(diffuse::path_join("runs//", "/x"), "runs/x");
  EXPECT_EQ(diffuse::path_join("/", "x"), "/x");
  EXPECT_EQ(diffuse::path_join("", "x"), "x");
  EXPECT_EQ(diffuse::path_join("a/b", ""), "a/b");
  EXPECT_EQ(diffuse::path_join("a", "b/c"), "a/b/c");
}

}  // namespace
