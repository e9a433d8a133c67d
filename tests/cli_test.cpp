// The `diffuse` program as a user meets it: help, info on the default data set, and bad input turned
// into one line on stderr with exit code 2 — never a crash.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "diffuse/io/checkpoint.h"

namespace fs = std::filesystem;

namespace {

struct CliRun {
  int code = -1;
  std::string out;
  std::string err;
};

// Runs the CLI with arguments (a shell-quoted string), capturing stdout and stderr.
CliRun run_cli(const std::string& args) {
  std::string base = (fs::temp_directory_path() / ("diffuse_cli_" + std::to_string(::getpid()))).string();
  std::string cmd = std::string(DIFFUSE_CLI) + " " + args + (args.rfind("train", 0) == 0 || args.rfind("sample", 0) == 0 || args.rfind("convert", 0) == 0 ? " --threads 1" : "") + " >" + base + ".out 2>" + base + ".err";
  int status = std::system(cmd.c_str());
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

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

std::string tmp(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("diffuse_cli_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p.string();
}

}  // namespace

TEST(Cli, HelpListsSubcommands) {
  CliRun r = run_cli("--help");
  EXPECT_EQ(r.code, 0);
  for (const char* sub : {"train", "sample", "info", "convert", "samplers"}) {
    EXPECT_NE(r.out.find(sub), std::string::npos) << sub;
  }
}

TEST(Cli, InfoOnFashionMnistTrain) {
  CliRun r = run_cli("info fashion-mnist:train --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["count"], 60000);
  EXPECT_EQ(j["height"], 28);
  EXPECT_EQ(j["width"], 28);
  EXPECT_EQ(j["channels"], 1);
  for (const auto& c : j["label_histogram"]) EXPECT_EQ(c, 6000);
}

TEST(Cli, InfoOnDiffusersFixture) {
  CliRun r = run_cli(std::string("info ") + DIFFUSE_FIXTURES + "/diffusers_unet2d/tiny --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["parameters"], 702499);
  EXPECT_EQ(j["count"], 144);
}

TEST(Cli, BadInputIsOneLineAndExitCodeTwo) {
  std::string dir = tmp("bad");
  fs::create_directories(dir);
  { std::ofstream(dir + "/model.pt") << "\x80\x02not really"; }
  { std::ofstream(dir + "/garbage.safetensors") << "12345678garbage"; }
  fs::create_directories(dir + "/empty");
  const std::vector<std::string> cases = {
      "info /nonexistent/path",
      "info " + dir + "/model.pt",
      "info " + dir + "/garbage.safetensors",
      "info idx:/nonexistent.idx",
      "info folder:" + dir + "/empty",
      "sample --ckpt /nonexistent --out " + dir + "/x.png",
      "sample --ckpt " + std::string(DIFFUSE_FIXTURES) + "/diffusers_unet2d/tiny --sampler nosuch --out " + dir + "/x.png",
      "sample --ckpt " + std::string(DIFFUSE_FIXTURES) + "/diffusers_unet2d/tiny --n 0 --out " + dir + "/x.png",
      "sample --ckpt " + std::string(DIFFUSE_FIXTURES) + "/diffusers_unet2d/tiny --class 3 --out " + dir + "/x.png",
      "train --preset nosuchpreset --out " + dir + "/run",
      "train --preset tiny --data folder:" + dir + "/empty --out " + dir + "/run",
      "train --preset tiny --steps -5 --out " + dir + "/run",
      "train --preset tiny --process nonsense --out " + dir + "/run",
      "nosuchcommand",
  };
  for (const auto& c : cases) {
    CliRun r = run_cli(c);
    EXPECT_EQ(r.code, 2) << c << "\n" << r.err;
    EXPECT_GE(count_lines(r.err), 1) << c;
    EXPECT_LE(count_lines(r.err), 2) << c << "\n" << r.err;  // CLI11 may add a hint line
    EXPECT_FALSE(fs::exists(dir + "/x.png")) << c;
  }
  fs::remove_all(dir);
}

TEST(Cli, TrainSampleConvertRoundTrip) {
  std::string dir = tmp("roundtrip");
  CliRun t = run_cli("train --preset tiny --steps 20 --sample-every 0 --out " + dir + "/run --json");
  ASSERT_EQ(t.code, 0) << t.err;
  CliRun s = run_cli("sample --ckpt " + dir + "/run --n 9 --sampler ddim --steps 5 --out " + dir + "/grid.png --json");
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_TRUE(fs::exists(dir + "/grid.png"));
  CliRun n = run_cli("sample --ckpt " + dir + "/run --n 5 --steps 5 --out " + dir + "/s.npy");
  ASSERT_EQ(n.code, 0) << n.err;
  EXPECT_EQ(fs::file_size(dir + "/s.npy"), 128u + 5 * 8 * 8);
  CliRun c = run_cli("convert " + dir + "/run " + dir + "/hf");
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_TRUE(fs::exists(dir + "/hf/diffusion_pytorch_model.safetensors"));
  // The diffusers folder samples the same images as the checkpoint (EMA weights in both).
  CliRun s2 = run_cli("sample --ckpt " + dir + "/hf --n 9 --sampler ddim --steps 5 --out " + dir + "/grid2.png");
  ASSERT_EQ(s2.code, 0) << s2.err;
  std::ifstream a(dir + "/grid.png", std::ios::binary), b(dir + "/grid2.png", std::ios::binary);
  std::string sa((std::istreambuf_iterator<char>(a)), {}), sb((std::istreambuf_iterator<char>(b)), {});
  EXPECT_EQ(sa, sb);
  fs::remove_all(dir);
}

TEST(Cli, KillNineLeavesALoadableCheckpoint) {
  std::string dir = tmp("kill");
  // Start a run that checkpoints every step, kill it at several moments, check the last checkpoint loads.
  for (int attempt = 0; attempt < 4; ++attempt) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      std::string out = dir + "/run";
      freopen("/dev/null", "w", stderr);
      freopen("/dev/null", "w", stdout);
      execl(DIFFUSE_CLI, DIFFUSE_CLI, "train", "--preset", "tiny", "--steps", "100000", "--ckpt-every", "1",
            "--sample-every", "0", "--threads", "1", "--resume", "--out", out.c_str(), (char*)nullptr);
      _exit(127);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(3000 + 370 * attempt));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    if (!diffuse::checkpoint_resolve(dir + "/run").empty()) {
      diffuse::Checkpoint c = diffuse::checkpoint_load(dir + "/run");
      EXPECT_GT(c.model.size(), 0u);
      EXPECT_FALSE(c.ema.empty());
    }
  }
  EXPECT_FALSE(diffuse::checkpoint_resolve(dir + "/run").empty()) << "no checkpoint was ever completed";
  fs::remove_all(dir);
}
