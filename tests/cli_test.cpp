// The `diffuse` program as a user meets it: help, info on the default data set, and bad input turned
// into one line on stderr with exit code 2 — never a crash.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "diffuse/common.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"
#include "diffuse/nn/unet.h"
#include "diffuse/train/cuda_graph.h"
#include "diffuse/train/distributed.h"
#include "diffuse/version.h"

#include "cli_util.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

using diffuse_test::CliRun;
using diffuse_test::run_cli_serial;

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

std::string tmp(const std::string& name) {
  fs::path p = diffuse_test::temp_root() / ("diffuse_cli_test_" + name + "_" + std::to_string(::getpid()));
  diffuse_test::remove_tree(p);
  return p.string();
}

}  // namespace

TEST(Cli, HelpListsSubcommands) {
  CliRun r = run_cli_serial("--help");
  EXPECT_EQ(r.code, 0);
  for (const char* sub : {"train", "sample", "info", "convert", "samplers"}) {
    EXPECT_NE(r.out.find(sub), std::string::npos) << sub;
  }
}

// --version names the LibTorch and the optional parts this build has (gpu-check's summary quotes it).
TEST(Cli, VersionSaysWhatTheBuildHolds) {
  CliRun r = run_cli_serial("--version");
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.out.rfind(std::string("diffuse ") + diffuse::version() + " (LibTorch " + TORCH_VERSION, 0), 0u) << r.out;
  for (const auto& [part, built] : std::vector<std::pair<std::string, bool>>{
           {"c10d", diffuse::distributed_available()},
           {"CUDA graphs", diffuse::cuda_graphs_built()},
           {"fused CUDA kernels", diffuse::fused_norm_built()}}) {
    EXPECT_NE(r.out.find(part + ": " + (built ? "yes" : "no")), std::string::npos) << part << " in " << r.out;
  }
  const std::string winograd = diffuse::cpu_winograd_built() ? "oneDNN 2 + own" : "own";
  EXPECT_NE(r.out.find("CPU Winograd: " + winograd + ","), std::string::npos) << r.out;
}

TEST(Cli, InfoOnFashionMnistTrain) {
  CliRun r = run_cli_serial("info fashion-mnist:train --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["count"], 60000);
  EXPECT_EQ(j["height"], 28);
  EXPECT_EQ(j["width"], 28);
  EXPECT_EQ(j["channels"], 1);
  for (const auto& c : j["label_histogram"]) EXPECT_EQ(c, 6000);
}

TEST(Cli, InfoOnDiffusersFixture) {
  CliRun r = run_cli_serial(std::string("info ") + DIFFUSE_FIXTURES + "/diffusers_unet2d/tiny --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["parameters"], 702499);
  EXPECT_EQ(j["count"], 144);
}

TEST(Cli, BadInputIsOneLineAndExitCodeTwo) {
  std::string dir = tmp("bad");
  diffuse_test::make_dirs(dir);
  { std::ofstream(dir + "/model.pt") << "\x80\x02not really"; }
  { std::ofstream(dir + "/garbage.safetensors") << "12345678garbage"; }
  diffuse_test::make_dirs(dir + "/empty");
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
    CliRun r = run_cli_serial(c);
    EXPECT_EQ(r.code, 2) << c << "\n" << r.err;
    EXPECT_GE(count_lines(r.err), 1) << c;
    EXPECT_LE(count_lines(r.err), 2) << c << "\n" << r.err;  // CLI11 may add a hint line
    EXPECT_FALSE(fs::exists(dir + "/x.png")) << c;
  }
  diffuse_test::remove_tree(dir);
}

TEST(Cli, TrainSampleConvertRoundTrip) {
  std::string dir = tmp("roundtrip");
  CliRun t = run_cli_serial("train --preset tiny --steps 20 --sample-every 0 --out " + dir + "/run --json");
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_TRUE(t.err.empty()) << "--json: no progress lines on stderr, got " << t.err;
  EXPECT_EQ(nlohmann::json::parse(t.out).value("step", 0), 20) << t.out;
  CliRun s = run_cli_serial("sample --ckpt " + dir + "/run --n 9 --sampler ddim --steps 5 --out " + dir +
                            "/grid.png --json");
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_TRUE(fs::exists(dir + "/grid.png"));
  CliRun n = run_cli_serial("sample --ckpt " + dir + "/run --n 5 --steps 5 --out " + dir + "/s.npy");
  ASSERT_EQ(n.code, 0) << n.err;
  EXPECT_EQ(fs::file_size(dir + "/s.npy"), 128u + 5 * 8 * 8);
  CliRun c = run_cli_serial("convert " + dir + "/run " + dir + "/hf");
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_TRUE(fs::exists(dir + "/hf/diffusion_pytorch_model.safetensors"));
  // The diffusers folder samples the same images as the checkpoint (EMA weights in both).
  CliRun s2 = run_cli_serial("sample --ckpt " + dir + "/hf --n 9 --sampler ddim --steps 5 --out " + dir +
                             "/grid2.png");
  ASSERT_EQ(s2.code, 0) << s2.err;
  std::ifstream a(dir + "/grid.png", std::ios::binary), b(dir + "/grid2.png", std::ios::binary);
  std::string sa((std::istreambuf_iterator<char>(a)), {}), sb((std::istreambuf_iterator<char>(b)), {});
  EXPECT_EQ(sa, sb);
  diffuse_test::remove_tree(dir);
}

// Trains the tiny preset for 3 steps with `flags` into DIR/run, then resumes it without them to step 5; returns the
// run configuration's train.KEY as written by each (false where a run failed, which is reported).
std::pair<bool, bool> train_then_resume(const std::string& dir, const std::string& flags, const std::string& key) {
  auto value = [&] {
    return nlohmann::json::parse(diffuse::read_file(dir + "/run/config.json"))["train"].value(key, false);
  };
  CliRun t = run_cli_serial("train --preset tiny " + flags +
                            " --steps 3 --ckpt-every 3 --sample-every 0 --out " + dir + "/run --json");
  EXPECT_EQ(t.code, 0) << t.err;
  if (t.code != 0) return {false, false};
  const bool first = value();
  CliRun r = run_cli_serial("train --out " + dir + "/run --resume --steps 5 --json");
  EXPECT_EQ(r.code, 0) << r.err;
  if (r.code != 0) return {first, false};
  EXPECT_EQ(nlohmann::json::parse(r.out).value("step", 0), 5);
  return {first, value()};
}

// `diffuse sample` twice from DIR/run with `args`, into DIR/a.npy and then with `flag` into DIR/b.npy; false where
// either failed (reported).
bool sample_without_and_with(const std::string& dir, const std::string& args, const std::string& flag) {
  const std::string s = "sample --ckpt " + dir + "/run " + args + " --out ";
  CliRun a = run_cli_serial(s + dir + "/a.npy"), b = run_cli_serial(s + dir + "/b.npy " + flag);
  EXPECT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(b.code, 0) << b.err;
  return a.code == 0 && b.code == 0;
}

// --reduced-norm is a property of the run: stored in its checkpoint and kept when it resumes; sampling takes it
// per invocation, and it changes the bf16 arithmetic.
TEST(Cli, ReducedNormTrainsResumesAndSamples) {
  std::string dir = tmp("reducednorm");
  const auto [trained, resumed] = train_then_resume(dir, "--precision bf16 --reduced-norm", "reduced_norm");
  EXPECT_TRUE(trained);
  EXPECT_TRUE(resumed);
  ASSERT_TRUE(sample_without_and_with(dir, "--n 4 --steps 3 --precision bf16", "--reduced-norm"));
  const std::string sa = diffuse::read_file(dir + "/a.npy"), sb = diffuse::read_file(dir + "/b.npy");
  EXPECT_EQ(sa.size(), sb.size());
  EXPECT_NE(sa, sb) << "--reduced-norm left the bf16 arithmetic unchanged";
  diffuse_test::remove_tree(dir);
}

// --channels-last: training runs with it (a choice of this invocation: recorded, not carried into a resume), and
// sampling with it draws the NCHW images up to the kernels' rounding (at most one grey level in a few pixels).
TEST(Cli, ChannelsLastTrainsAndSamples) {
  std::string dir = tmp("channelslast");
  const auto [trained, resumed] = train_then_resume(dir, "--channels-last", "channels_last");
  EXPECT_TRUE(trained);
  EXPECT_FALSE(resumed);
  ASSERT_TRUE(sample_without_and_with(dir, "--n 6 --steps 4", "--channels-last"));
  const at::Tensor ia = diffuse::npy_load_uint8(dir + "/a.npy").to(at::kInt);
  const at::Tensor ib = diffuse::npy_load_uint8(dir + "/b.npy").to(at::kInt);
  ASSERT_EQ(ia.sizes(), ib.sizes());
  const at::Tensor diff = (ia - ib).abs();
  EXPECT_LE(diff.max().item<int>(), 1);
  EXPECT_LE(diff.gt(0).sum().item<int64_t>(), ia.numel() / 100);
  EXPECT_GT(ia.to(at::kFloat).std().item<double>(), 1.0);  // not a blank image
  diffuse_test::remove_tree(dir);
}

// SIGTERM or SIGINT while an output is being written: the process ends by that signal and leaves neither
// the output nor its temporary file (a .npy written in pieces) or folder (a folder of PNGs being filled).
TEST(Cli, TerminatedWriterLeavesNoTemporaryFile) {
  const std::string dir = tmp("sigterm"), run = dir + "/run", out = dir + "/out";
  CliRun t = run_cli_serial("train --preset tiny --steps 5 --sample-every 0 --out " + run + " --json");
  ASSERT_EQ(t.code, 0) << t.err;
  fs::create_directories(out);
  struct Case {
    int sig;
    std::string target, steps;
  };
  for (const Case& c : {Case{SIGTERM, "s.npy", "500"}, Case{SIGINT, "s.npy", "500"}, Case{SIGTERM, "pngs", "10"}}) {
    SCOPED_TRACE("signal " + std::to_string(c.sig) + ", --out " + c.target);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      freopen("/dev/null", "w", stderr);
      freopen("/dev/null", "w", stdout);
      // Far more work than the test waits for: the writer is killed mid-way.
      execl(DIFFUSE_CLI, DIFFUSE_CLI, "sample", "--ckpt", run.c_str(), "--n", "20000", "--steps", c.steps.c_str(),
            "--batch", "16", "--threads", "1", "--out", (out + "/" + c.target).c_str(), (char*)nullptr);
      _exit(127);
    }
    // The temporary output, once it holds something (for the folder: a first PNG).
    auto started = [&] {
      for (const auto& e : fs::directory_iterator(out)) {
        if (e.path().filename().string().find(".tmp.") == std::string::npos) continue;
        if (!e.is_directory()) return true;
        for (const auto& f : fs::directory_iterator(e.path())) {
          if (f.path().extension() == ".png") return true;
        }
      }
      return false;
    };
    const auto t0 = std::chrono::steady_clock::now();
    int status = 0;
    bool exited = false;
    while (!started() && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
      if (waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ASSERT_FALSE(exited) << "sample ended before it was signalled (status " << status << ")";
    ASSERT_TRUE(started()) << "no temporary output appeared within 60 s";
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // well inside the sampling loop
    kill(pid, c.sig);
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == c.sig) << "status " << status;
    EXPECT_TRUE(fs::is_empty(out)) << "files left in " << out;
    diffuse_test::remove_tree(out);
    fs::create_directories(out);
  }
  diffuse_test::remove_tree(dir);
}

// Whether a step_* directory under run/checkpoints lacks its state.json (a checkpoint being written).
bool has_incomplete_checkpoint(const std::string& run) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run + "/checkpoints", ec)) {
    if (e.path().filename().string().rfind("step_", 0) == 0 && !fs::exists(e.path() / "state.json")) return true;
  }
  return false;
}

// kill -9 at random moments (some while a checkpoint is half written, which DIFFUSE_DEBUG_CHECKPOINT_PAUSE_MS
// makes likely and the polling kills make certain), resume each time, then finish: after every kill the
// newest complete checkpoint loads with its checksums verified, progress never goes back, and the run ends
// at its last step. DIFFUSE_CRASH_SEED=N replays one sequence of kill times.
TEST(Cli, RandomKillNineResumesFromAnIntactCheckpoint) {
  const std::string dir = tmp("kill"), run = dir + "/run";
  const char* seed_env = std::getenv("DIFFUSE_CRASH_SEED");
  const unsigned seed = seed_env ? static_cast<unsigned>(std::strtoul(seed_env, nullptr, 10)) : std::random_device{}();
  std::mt19937 rng(seed);
  SCOPED_TRACE("DIFFUSE_CRASH_SEED=" + std::to_string(seed));
  // Long enough that the six attempts cannot finish it: each delayed kill comes within 2.5 s (~10 steps with
  // the 40 ms pauses), each polled kill inside the attempt's first checkpoint write.
  const int64_t kSteps = 48;
  auto start_training = [&]() {
    pid_t pid = fork();
    if (pid == 0) {
      freopen("/dev/null", "w", stderr);
      freopen("/dev/null", "w", stdout);
      setenv("DIFFUSE_DEBUG_CHECKPOINT_PAUSE_MS", "40", 1);
      execl(DIFFUSE_CLI, DIFFUSE_CLI, "train", "--preset", "tiny", "--steps", std::to_string(kSteps).c_str(),
            "--ckpt-every", "1", "--sample-every", "0", "--threads", "1", "--resume", "--out", run.c_str(), (char*)nullptr);
      _exit(127);
    }
    return pid;
  };
  int64_t last_step = 0;
  int kills = 0, kills_inside_writes = 0;
  for (int attempt = 0; attempt < 6; ++attempt) {
    pid_t pid = start_training();
    ASSERT_GT(pid, 0);
    const auto t0 = std::chrono::steady_clock::now();
    const bool wait_for_write = attempt % 2 == 1;  // kill as soon as a checkpoint is seen half written
    const int delay_ms = std::uniform_int_distribution<int>(200, 2500)(rng);
    int status = 0;
    bool exited = false;
    while (true) {
      if (waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
      if (wait_for_write ? (has_incomplete_checkpoint(run) || ms > 20000) : ms >= delay_ms) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(wait_for_write ? 1 : 5));
    }
    if (!exited) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ++kills;
    }
    ASSERT_TRUE(exited ? WIFEXITED(status) && WEXITSTATUS(status) == 0 : WIFSIGNALED(status))
        << "attempt " << attempt << ": training failed on its own (status " << status << ")";
    if (has_incomplete_checkpoint(run)) ++kills_inside_writes;
    if (diffuse::checkpoint_resolve(run).empty()) continue;  // killed before the first checkpoint
    diffuse::Checkpoint c;
    ASSERT_NO_THROW(c = diffuse::checkpoint_load(run)) << "attempt " << attempt;
    EXPECT_GT(c.model.size(), 0u);
    EXPECT_FALSE(c.ema.empty());
    EXPECT_FALSE(c.optimizer.empty());
    EXPECT_GE(c.state.step, last_step) << "attempt " << attempt << ": the run went back";
    last_step = c.state.step;
    if (exited) break;
  }
  std::fprintf(stderr, "%d kills, %d inside a checkpoint write, last step before finishing %lld\n", kills,
               kills_inside_writes, static_cast<long long>(last_step));
  EXPECT_GE(kills, 3);
  EXPECT_GE(kills_inside_writes, 1) << "no kill landed inside a checkpoint write";
  // Resume once more without a kill: the run finishes at its last step.
  pid_t pid = start_training();
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  diffuse::Checkpoint c = diffuse::checkpoint_load(run);
  EXPECT_EQ(c.state.step, kSteps);
  EXPECT_FALSE(has_incomplete_checkpoint(run));
  diffuse_test::remove_tree(dir);
}

// SIGTERM (or Ctrl-C) while a checkpoint is half written: the folder being written, and one being pruned, go
// with the process; every step_* folder left is complete and the newest loads.
TEST(Cli, SigtermInsideACheckpointWriteLeavesNoPartialFolder) {
  const std::string dir = tmp("sigterm"), run = dir + "/run";
  int caught_inside = 0;
  for (int attempt = 0; attempt < 3; ++attempt) {
    pid_t pid = fork();
    if (pid == 0) {
      freopen("/dev/null", "w", stderr);
      freopen("/dev/null", "w", stdout);
      setenv("DIFFUSE_DEBUG_CHECKPOINT_PAUSE_MS", "40", 1);
      execl(DIFFUSE_CLI, DIFFUSE_CLI, "train", "--preset", "tiny", "--steps", "400", "--ckpt-every", "1",
            "--sample-every", "0", "--threads", "1", "--resume", "--out", run.c_str(), (char*)nullptr);
      _exit(127);
    }
    ASSERT_GT(pid, 0);
    // Wait until a checkpoint is seen half written (the pause makes each write last > 100 ms).
    const auto t0 = std::chrono::steady_clock::now();
    bool inside = false;
    while (!(inside = has_incomplete_checkpoint(run)) && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    kill(pid, SIGTERM);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "status " << status;
    if (inside) ++caught_inside;
    EXPECT_FALSE(has_incomplete_checkpoint(run)) << "attempt " << attempt << ": a partial step_* folder was left";
    if (diffuse::checkpoint_resolve(run).empty()) continue;  // stopped inside the first write
    EXPECT_NO_THROW(diffuse::checkpoint_load(run)) << "attempt " << attempt;
  }
  EXPECT_GE(caught_inside, 2) << "SIGTERM did not land inside a checkpoint write";
  diffuse_test::remove_tree(dir);
}

// state.json records a CRC-32 per file; a flipped byte in any of them is refused with a line naming the file,
// and a checkpoint without checksums (written before they existed) still loads.
TEST(Cli, CheckpointChecksumsAreVerifiedOnLoad) {
  const std::string dir = tmp("checksum"), run = dir + "/run";
  CliRun t = run_cli_serial("train --preset tiny --steps 2 --sample-every 0 --out " + run);
  ASSERT_EQ(t.code, 0) << t.err;
  // Resuming a finished run trains nothing and says so.
  CliRun again = run_cli_serial("train --preset tiny --steps 2 --sample-every 0 --resume --out " + run);
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_EQ(again.out.rfind("already at step 2 of 2, nothing to train", 0), 0u) << again.out;
  const std::string ckpt = diffuse::checkpoint_resolve(run);
  ASSERT_FALSE(ckpt.empty());
  auto slurp = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  };
  auto spit = [](const std::string& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; };
  const std::string state = slurp(ckpt + "/state.json");
  ASSERT_NE(state.find("\"checksums\""), std::string::npos) << state;
  for (const char* name : {"config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors"}) {
    const std::string path = ckpt + "/" + name, good = slurp(path);
    ASSERT_FALSE(good.empty()) << name;
    std::string bad = good;
    bad[bad.size() - 2] ^= 0x01;  // a flipped bit in the data (or JSON whitespace), still parseable
    spit(path, bad);
    try {
      diffuse::checkpoint_load(run);
      ADD_FAILURE() << name << ": corrupt file loaded";
    } catch (const diffuse::Error& e) {
      EXPECT_EQ(e.exit_code(), 2);
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
    }
    CliRun s = run_cli_serial("sample --ckpt " + run + " --n 1 --steps 1 --out " + dir + "/x.png");
    if (std::string(name) != "optimizer.safetensors") {  // sampling does not read the optimizer
      EXPECT_EQ(s.code, 2) << name << ": " << s.err;
      EXPECT_EQ(count_lines(s.err), 1) << s.err;
    }
    spit(path, good);
  }
  // Without "checksums" (an older checkpoint): loads unchecked.
  nlohmann::json old_state = nlohmann::json::parse(state);
  old_state.erase("checksums");
  spit(ckpt + "/state.json", old_state.dump(2));
  EXPECT_NO_THROW(diffuse::checkpoint_load(run));
  diffuse_test::remove_tree(dir);
}