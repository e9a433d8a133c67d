// Shared pieces of the `diffuse` program: each subcommand registers itself on the CLI11 app and runs
// through run_guarded, which turns library errors into one line on stderr and an exit code.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace diffuse::cli {

// Options every subcommand has.
struct Common {
  int64_t threads = 0;  // 0: all cores
  bool json = false;    // machine-readable output
};

// Adds --threads and --json to a subcommand.
inline void add_common(CLI::App* sub, Common& common) {
  sub->add_option("--threads", common.threads, "CPU threads (default: all cores)")->check(CLI::NonNegativeNumber);
  sub->add_flag("--json", common.json, "print machine-readable JSON");
}

void register_train(CLI::App& app, Common& common);
void register_sample(CLI::App& app, Common& common);
void register_info(CLI::App& app, Common& common);
void register_convert(CLI::App& app, Common& common);
void register_samplers(CLI::App& app, Common& common);
void register_eval(CLI::App& app, Common& common);
void register_classifier(CLI::App& app, Common& common);
void register_report(CLI::App& app, Common& common);
void register_nll(CLI::App& app, Common& common);
void register_edit(CLI::App& app, Common& common);     // inpaint, upscale, edit, colorize
void register_trace(CLI::App& app, Common& common);
void register_augment(CLI::App& app, Common& common);

// `diffuse train --nproc N`: runs this program's command line (without --nproc) as N local ranks with the
// torchrun environment; returns the exit code (app/launch.cpp).
int launch_ranks(int64_t nproc);

// Sets the thread count, runs fn, maps diffuse::Error to its exit code (message on stderr), and
// exits the process with the code.
void run_guarded(const Common& common, const std::function<int()>& fn);

}  // namespace diffuse::cli
