// `diffuse train --nproc N`: a local launcher in the manner of torchrun. It re-runs this program's command
// line (without --nproc) as N children with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT,
// the port of the rendezvous store it serves itself (diffuse::LauncherStore: bound before the children start, so
// no other process can take it in between), forwards SIGINT/SIGTERM/SIGHUP to them, and when one fails stops the
// others.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <thread>
#include <vector>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/train/distributed.h"

namespace diffuse::cli {
namespace {

std::vector<pid_t> g_children;          // read by the signal handler
volatile sig_atomic_t g_signal = 0;     // the signal forwarded, if any

void forward_signal(int sig) {
  g_signal = sig;
  for (pid_t pid : g_children)
    if (pid > 0) ::kill(pid, sig);
}

// This process's argv, as the kernel has it.
std::vector<std::string> own_command_line() {
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  std::string cur;
  for (char c : all) {
    if (c == '\0') {
      args.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (args.empty()) throw run_error("--nproc: cannot read this program's command line from /proc/self/cmdline");
  return args;
}

std::string describe(int status) {
  if (WIFEXITED(status)) return "exit code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("signal ") + strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

}  // namespace

int launch_ranks(int64_t nproc) {
  if (std::getenv("WORLD_SIZE") && std::string(std::getenv("WORLD_SIZE")) != "1") {
    throw input_error("--nproc launches its own ranks; it cannot run inside a distributed environment (WORLD_SIZE is set)");
  }
  // The command line without --nproc; each rank gets cores / N threads unless --threads was given.
  std::vector<std::string> args;
  bool threads_given = false;
  const std::vector<std::string> all = own_command_line();
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i] == "--nproc") {
      ++i;
      continue;
    }
    if (all[i].rfind("--nproc=", 0) == 0) continue;
    if (all[i] == "--threads" || all[i].rfind("--threads=", 0) == 0) threads_given = true;
    args.push_back(all[i]);
  }
  if (!threads_given) {
    args.push_back("--threads");
    args.push_back(std::to_string(std::max<int64_t>(1, hardware_threads() / nproc)));
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const LauncherStore store(nproc);
  // Each child's environment is built here: between fork and exec (the store's server thread runs in this
  // process) the child calls only async-signal-safe functions.
  std::vector<std::vector<std::string>> envs(static_cast<size_t>(nproc));
  std::vector<std::vector<char*>> envps(static_cast<size_t>(nproc));
  for (int64_t r = 0; r < nproc; ++r) {
    const std::vector<std::pair<std::string, std::string>> vars = {
        {"RANK", std::to_string(r)},
        {"LOCAL_RANK", std::to_string(r)},
        {"WORLD_SIZE", std::to_string(nproc)},
        {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
        {"MASTER_ADDR", "127.0.0.1"},
        {"MASTER_PORT", std::to_string(store.port())},
        {"TORCHELASTIC_USE_AGENT_STORE", "True"},
        {"DIFFUSE_NPROC_CHILD", "1"}};
    std::vector<std::string>& env = envs[static_cast<size_t>(r)];
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string entry = *e;
      const std::string name = entry.substr(0, entry.find('='));
      bool replaced = false;
      for (const auto& v : vars) replaced = replaced || v.first == name;
      if (!replaced) env.push_back(entry);
    }
    for (const auto& v : vars) env.push_back(v.first + "=" + v.second);
    for (std::string& entry : env) envps[static_cast<size_t>(r)].push_back(entry.data());
    envps[static_cast<size_t>(r)].push_back(nullptr);
  }

  std::cout.flush();
  std::cerr.flush();
  g_children.assign(static_cast<size_t>(nproc), 0);
  struct sigaction sa {};
  sa.sa_handler = forward_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
  const pid_t parent = ::getpid();
  for (int64_t r = 0; r < nproc; ++r) {
    pid_t pid = ::fork();
    if (pid < 0) {
      forward_signal(SIGTERM);
      throw run_error(std::string("--nproc: fork: ") + std::strerror(errno));
    }
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // a launcher killed with -9 takes its ranks along
      if (::getppid() != parent) ::_exit(kExitFailure);
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &dfl, nullptr);
      ::execve("/proc/self/exe", argv.data(), envps[static_cast<size_t>(r)].data());
      static const char msg[] = "error: --nproc: cannot run this program again (/proc/self/exe)\n";
      (void)!::write(2, msg, sizeof(msg) - 1);
      ::_exit(kExitFailure);
    }
    g_children[static_cast<size_t>(r)] = pid;
  }

  // Wait for all; on the first failure stop the others: SIGTERM (after 3 s when it was bad input, which
  // the others are likely to find too, so that rank 0 gets to say it), then SIGKILL 10 s later.
  using SteadyClock = std::chrono::steady_clock;
  int64_t running = nproc, failed_rank = -1;
  int failed_status = 0;
  std::vector<int> statuses(static_cast<size_t>(nproc), -1);
  auto term_at = SteadyClock::time_point::max(), kill_at = SteadyClock::time_point::max();
  auto signal_all = [&](int sig) {
    for (pid_t c : g_children)
      if (c > 0) ::kill(c, sig);
  };
  while (running > 0) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid < 0 && errno != EINTR) break;
    if (pid <= 0) {
      if (SteadyClock::now() > term_at) {
        signal_all(SIGTERM);
        term_at = SteadyClock::time_point::max();
        kill_at = SteadyClock::now() + std::chrono::seconds(10);
      }
      if (SteadyClock::now() > kill_at) {
        signal_all(SIGKILL);
        kill_at = SteadyClock::time_point::max();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    for (size_t r = 0; r < g_children.size(); ++r) {
      if (g_children[r] != pid) continue;
      g_children[r] = 0;
      statuses[r] = status;
      --running;
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!ok && failed_rank < 0) {
        failed_rank = static_cast<int64_t>(r);
        failed_status = status;
        const bool bad_input = WIFEXITED(status) && WEXITSTATUS(status) == kExitBadInput;
        term_at = SteadyClock::now() + std::chrono::seconds(bad_input ? 3 : 0);
      }
    }
  }
  if (g_signal != 0) {
    std::cerr << "error: interrupted (" << strsignal(g_signal) << "); stopped the " << nproc << " ranks\n";
    return kExitFailure;
  }
  if (failed_rank < 0) return kExitOk;
  // Rank 0 prints the one line of bad input (the others stay silent on it); anything else gets a line here.
  if (WIFEXITED(failed_status) && WEXITSTATUS(failed_status) == kExitBadInput) {
    const bool rank0_said_it = WIFEXITED(statuses[0]) && WEXITSTATUS(statuses[0]) == kExitBadInput;
    if (!rank0_said_it) std::cerr << "error: rank " << failed_rank << " of " << nproc << " stopped on bad input that rank 0 did not see\n";
    return kExitBadInput;
  }
  std::cerr << "error: rank " << failed_rank << " of " << nproc << " failed (" << describe(failed_status)
            << "); stopped the other ranks\n";
  return kExitFailure;
}

}  // namespace diffuse::cli
