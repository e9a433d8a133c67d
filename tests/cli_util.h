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

// Runs `diffuse ARGS` single-threaded (`--threads 1` appended) when it computes (tests run two at a time on
// two cores): ARGS starting with train, sample, convert or an editing command.
inline CliRun run_cli_serial(const std::string& args) {
  bool compute = false;
  for (const char* c :
       {"train", "sample", "convert", "inpaint", "upscale", "edit", "colorize", "trace", "augment"}) {
    compute = compute || args.rfind(std::string(c) + " ", 0) == 0;
  }
  return run_cli(args + (compute ? " --threads 1" : ""));
}

}  // namespace diffuse_test
