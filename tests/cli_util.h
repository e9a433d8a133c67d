// Shared helpers for tests that run the `diffuse` program (DIFFUSE_CLI) as a user would.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include "test_util.h"

namespace diffuse_test {

struct CliRun {
  int code = -1;     // exit code; 128 + signal when killed
  std::string out;   // stdout
  std::string err;   // stderr
};

// Runs `diffuse ARGS` (ARGS shell-quoted by the caller), capturing stdout and stderr.
inline CliRun run_cli(const std::string& args) {
  namespace fs = std::filesystem;
  static int counter = 0;
  const std::string base = (diffuse_test::temp_root() / ("diffuse_cli_" + std::to_string(::getpid()) + "_" +
                                                         std::to_string(counter++)))
                               .string();
  const std::string cmd = std::string(DIFFUSE_CLI) + " " + args + " >" + base + ".out 2>" + base + ".err";
  const int status = std::system(cmd.c_str());
  CliRun r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  auto slurp = [](const std::string& p) {
    std::ifstream f(p);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  };
  r.out = slurp(base + ".out");
  r.err = slurp(base + ".err");
  fs::remove(base + ".out");
  fs::remove(base + ".err");
  return r;
}

// A fresh (removed) path under the temp directory, unique to this process.
inline std::string temp_path(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path p = diffuse_test::temp_root() / ("diffuse_test_" + name + "_" + std::to_string(::getpid()));
  diffuse_test::remove_tree(p);
  return p.string();
}

}  // namespace diffuse_test
