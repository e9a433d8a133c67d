// The training loop: data resident in memory, batches without replacement per epoch, AdamW with
// warm-up and clipping over one flat buffer, EMA, periodic atomic checkpoints, sample grids and
// metrics.jsonl. Every random draw derives from (seed, step) or (seed, epoch), so a run resumed from a
// checkpoint reaches bit-identical parameters to one that never stopped.
//
//   diffuse::RunConfig cfg = diffuse::load_preset("tiny");
//   diffuse::TrainResult r = diffuse::train(cfg, "runs/tiny", /*resume=*/false);
#pragma once

#include <cstdint>
#include <string>

#include "diffuse/config.h"
#include "diffuse/data/dataset.h"
#include "diffuse/train/distributed.h"

namespace diffuse {

struct TrainResult {
  int64_t step = 0;             // steps done when the run ended
  int64_t steps_run = 0;        // steps this invocation ran (0: a resumed run that was already complete)
  double last_loss = 0.0;       // mean loss of the last logging window
  double first_loss = 0.0;      // mean loss of the first logging window of this invocation
  std::string checkpoint;       // the last checkpoint written
  bool stopped_by_budget = false;
};

struct TrainControl {
  int64_t stop_after_steps = 0;  // stop (with a checkpoint) after this many steps of this invocation (0: no)
  bool quiet = false;            // no progress output
  DistOptions dist;              // data-parallel rank and peers (world_size 1: a single process)
};

// Trains (or resumes, when resume is true and run_dir holds a checkpoint). Throws Error on bad input;
// run_error (exit code 1) when the loss becomes NaN/Inf, after which the last good checkpoint remains.
// Data-parallel (control.dist.world_size N > 1): cfg.train.batch_size is the global batch, N ranks take
// batch/N images each from the same global batch and draw the same noise for them, so N ranks train what
// one process does; rank 0 alone reads and writes the run directory (config, checkpoints, EMA, metrics,
// samples) and shares config and state with the others, which need only the data.
TrainResult train(RunConfig cfg, const std::string& run_dir, bool resume, const TrainControl& control = {});

// Learning rate at a step: linear warm-up to lr over warmup_steps, then constant.
double learning_rate(const TrainOptions& t, int64_t step);

}  // namespace diffuse
