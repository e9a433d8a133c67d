// Data-parallel training over LibTorch's c10d: one process per rank, ProcessGroupGloo on CPU and
// ProcessGroupNCCL on CUDA, rendezvous through a TCPStore on MASTER_ADDR:MASTER_PORT (the torchrun
// environment). The gradient lives in one flat buffer (FlatParameters), so it is all-reduced as a few
// contiguous buckets, each launched from the backward pass as soon as its gradients have landed.
//
//   diffuse::DistOptions d = diffuse::dist_options_from_env();      // RANK, WORLD_SIZE, ... (world 1 if unset)
//   auto comm = diffuse::Communicator::connect(d, device);
//   diffuse::GradReducer reducer(*comm, flat, params, /*bucket_numel=*/1 << 20);
//   reducer.prepare(); loss.backward(); reducer.finish();           // flat.grad() is now the mean over ranks
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace diffuse {

class FlatParameters;

struct DistOptions {
  int64_t rank = 0;          // RANK
  int64_t world_size = 1;    // WORLD_SIZE (1: not distributed)
  int64_t local_rank = 0;    // LOCAL_RANK: the CUDA device of this process
  std::string master_addr;   // MASTER_ADDR: the host of rank 0 (it serves the TCPStore)
  int64_t master_port = 0;   // MASTER_PORT
  double timeout_s = 120.0;  // every collective and the rendezvous fail after this long (--dist-timeout)
  int64_t bucket_numel = 1 << 20;  // gradient elements per all-reduce bucket (--dist-bucket-mb)
};

// Reads the torchrun variables. WORLD_SIZE unset (or 1): a single process. Throws input_error (exit 2)
// on a malformed or inconsistent environment (RANK >= WORLD_SIZE, missing MASTER_ADDR/MASTER_PORT, ...).
DistOptions dist_options_from_env();

// Whether this build has c10d (ProcessGroupGloo); without it, connect() throws input_error.
bool distributed_available();

// The rendezvous store of a local launcher (`diffuse train --nproc N`), served by the launcher itself on a port of
// 127.0.0.1 that it binds as it starts (the kernel's choice, so no other process can take it in between). Its
// ranks run with MASTER_PORT = port() and TORCHELASTIC_USE_AGENT_STORE=True, as under torchrun's agent: every
// rank is a client. Throws input_error without c10d, run_error when no port can be bound.
class LauncherStore {
 public:
  explicit LauncherStore(int64_t world_size);
  ~LauncherStore();
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One process group and the store it met through. Every collective waits at most options.timeout_s and
// then throws run_error (exit 1) with one line; so does a peer that died (its sockets close).
class Communicator {
 public:
  static std::unique_ptr<Communicator> connect(const DistOptions& options, const c10::Device& device);
  ~Communicator();
  int64_t rank() const;
  int64_t world_size() const;
  double timeout_s() const;
  void broadcast(at::Tensor& tensor, int64_t root);  // in place; waits
  void all_reduce_sum(at::Tensor& tensor);            // in place; waits
  // Rank 0 says it finished work the others do not share (checkpoint, samples, FD); the others wait for
  // it up to timeout_s, longer than a collective's timeout since that work may take minutes.
  void sync_after_rank0(const std::string& key, double timeout_s);
  // Rank 0 publishes a string under key; every other rank receives it (rank 0 gets its own back). Returns
  // once every rank has it.
  std::string share(const std::string& key, const std::string& value_on_rank0);

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit Communicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Averages the flat gradient over all ranks, overlapped with the backward pass: the flat buffer is cut
// into contiguous buckets in reverse parameter order (the order backward produces gradients), and a
// post-hook on each parameter's AccumulateGrad node counts down its bucket; a bucket whose gradients have
// all landed is divided by the world size and launched as an asynchronous all-reduce, strictly in bucket
// order so that every rank issues the same collectives in the same sequence. finish() launches any
// bucket whose parameters got no gradient in this step and waits for all of them.
class GradReducer {
 public:
  GradReducer(Communicator& comm, FlatParameters& flat, const std::vector<at::Tensor>& params, int64_t bucket_numel);
  ~GradReducer();
  void prepare();  // before backward()
  void finish();   // after backward(): flat.grad() holds the mean over ranks
  int64_t num_buckets() const;
  int64_t launched_in_backward() const;  // buckets of the last step launched before finish()

  struct State;

 private:
  std::shared_ptr<State> state_;  // shared with the hooks, which outlive this object on the graph nodes
  std::vector<std::shared_ptr<void>> keep_alive_;  // the AccumulateGrad nodes that carry the hooks
};

}  // namespace diffuse
