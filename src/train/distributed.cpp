#include "diffuse/train/distributed.h"

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "diffuse/common.h"
#include "diffuse/train/optim.h"

// DIFFUSE_HAVE_C10D / DIFFUSE_HAVE_NCCL come from CMake (headers found); USE_C10D_GLOO / USE_C10D_NCCL
// from LibTorch's targets (what it was built with).
#if defined(DIFFUSE_HAVE_C10D) && !defined(USE_C10D_GLOO)
#undef DIFFUSE_HAVE_C10D
#endif
#if defined(USE_C10D_NCCL) && defined(DIFFUSE_HAVE_NCCL)
#define DIFFUSE_C10D_NCCL 1
#endif

#ifdef DIFFUSE_HAVE_C10D
#include <torch/version.h>  // TORCH_VERSION_MAJOR: LibTorch 2 puts Gloo and NCCL behind c10d::Backend
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DIFFUSE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#endif

namespace diffuse {
namespace {

// An integer environment variable; `fallback` when unset; input_error when malformed.
int64_t env_int(const char* name, int64_t fallback, bool required) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    if (required) throw input_error(std::string("distributed: ") + name + " is not set (WORLD_SIZE > 1 needs RANK, MASTER_ADDR and MASTER_PORT)");
    return fallback;
  }
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0') throw input_error(std::string("distributed: ") + name + "='" + v + "' is not an integer");
  return x;
}

#ifdef DIFFUSE_HAVE_C10D
// The first line of an exception's message, for one-line errors.
std::string first_line(const std::exception& e) {
  std::string s;
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) {
    s = c->what_without_backtrace();
  } else {
    s = e.what();
  }
  std::string::size_type nl = s.find('\n');
  if (nl != std::string::npos) s = s.substr(0, nl);
  return s;
}
#endif

}  // namespace

DistOptions dist_options_from_env() {
  DistOptions d;
  d.world_size = env_int("WORLD_SIZE", 1, false);
  if (d.world_size < 1) throw input_error("distributed: WORLD_SIZE must be at least 1, not " + std::to_string(d.world_size));
  if (d.world_size == 1) return d;
  d.rank = env_int("RANK", 0, true);
  if (d.rank < 0 || d.rank >= d.world_size) {
    throw input_error("distributed: RANK=" + std::to_string(d.rank) + " is outside [0, WORLD_SIZE=" + std::to_string(d.world_size) + ")");
  }
  d.local_rank = env_int("LOCAL_RANK", 0, false);
  if (d.local_rank < 0) throw input_error("distributed: LOCAL_RANK must not be negative");
  const char* addr = std::getenv("MASTER_ADDR");
  if (!addr || !*addr) throw input_error("distributed: MASTER_ADDR is not set (WORLD_SIZE > 1 needs RANK, MASTER_ADDR and MASTER_PORT)");
  d.master_addr = addr;
  d.master_port = env_int("MASTER_PORT", 0, true);
  if (d.master_port < 1 || d.master_port > 65535) throw input_error("distributed: MASTER_PORT must be in [1, 65535], not " + std::to_string(d.master_port));
  return d;
}

#ifdef DIFFUSE_HAVE_C10D

namespace {
// LibTorch 2 split ProcessGroup (the dispatcher) from Backend (what Gloo and NCCL implement); both offer
// allreduce/broadcast with the same signatures.
#if TORCH_VERSION_MAJOR >= 2
using Group = c10d::Backend;
#else
using Group = c10d::ProcessGroup;
#endif
using WorkPtr = c10::intrusive_ptr<c10d::Work>;
using ms = std::chrono::milliseconds;

// LibTorch 2.4 and later serve and reach the store through libuv unless told otherwise (TCPStoreOptions::useLibUV,
// true by default); a LibTorch built without libuv (Debian's 2.6) then refuses to make a store at all. The other
// backend speaks the same protocol, so each side picks on its own. Older LibTorch has no such option.
template <typename O>
auto without_libuv(O& o, int) -> decltype(o.useLibUV = false, bool()) {
  if (!o.useLibUV) return false;
  o.useLibUV = false;
  return true;
}
template <typename O>
bool without_libuv(O&, long) {
  return false;
}

c10::intrusive_ptr<c10d::TCPStore> make_store(const std::string& host, c10d::TCPStoreOptions options) {
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, options);
  } catch (const std::exception& e) {
    if (std::string(e.what()).find("libuv") == std::string::npos || !without_libuv(options, 0)) throw;
  }
  return c10::make_intrusive<c10d::TCPStore>(host, options);
}
}  // namespace

bool distributed_available() { return true; }

struct Communicator::Impl {
  DistOptions options;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<Group> group;
  bool failed = false;

  ms timeout() const { return ms(static_cast<int64_t>(options.timeout_s * 1000.0)); }

  // Every distributed failure ends here: one line, exit code 1. A group with an operation that failed
  // is leaked rather than destroyed: its destructor joins worker threads that may still be blocked.
  [[noreturn]] void fail(const std::string& during, const std::exception& e) {
    failed = true;
    throw run_error("distributed: rank " + std::to_string(options.rank) + " of " + std::to_string(options.world_size) +
                    " failed during " + during + " (a peer died, hung or was unreachable; --dist-timeout " +
                    std::to_string(static_cast<int64_t>(options.timeout_s)) + " s): " + first_line(e));
  }
  void wait(const WorkPtr& work, const std::string& during) {
    try {
      work->wait();
    } catch (const std::exception& e) {
      fail(during, e);
    }
  }
};

Communicator::Communicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Communicator::~Communicator() {
  if (impl_ && impl_->failed) {
    impl_->group.release();  // see Impl::fail
    impl_->store.release();
  }
}

struct LauncherStore::Impl {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

LauncherStore::LauncherStore(int64_t world_size) : impl_(std::make_unique<Impl>()) {
  try {
    c10d::TCPStoreOptions so;
    so.port = 0;  // the kernel picks a free one
    so.isServer = true;
    so.numWorkers = static_cast<size_t>(world_size);
    so.waitWorkers = false;  // the ranks are not started yet
    impl_->store = make_store("127.0.0.1", so);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    throw run_error("--nproc: cannot serve the rendezvous store on 127.0.0.1: " + what.substr(0, what.find('\n')));
  }
}

LauncherStore::~LauncherStore() = default;

int LauncherStore::port() const { return impl_->store->getPort(); }

std::unique_ptr<Communicator> Communicator::connect(const DistOptions& options, const c10::Device& device) {
  if (!(options.timeout_s > 0)) throw input_error("--dist-timeout must be positive");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  const std::string where = options.master_addr + ":" + std::to_string(options.master_port);
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(options.master_port);
    // torchrun's agent may serve the store already (TORCHELASTIC_USE_AGENT_STORE=True): then every rank
    // is a client.
    const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
    so.isServer = options.rank == 0 && !(agent_store && std::string(agent_store) == "True");
    so.numWorkers = static_cast<size_t>(options.world_size);
    so.waitWorkers = true;
    so.timeout = impl->timeout();
    impl->store = make_store(options.master_addr, so);
  } catch (const std::exception& e) {
    impl->fail("the rendezvous at " + where, e);
  }
  try {
    if (device.is_cuda()) {
#ifdef DIFFUSE_C10D_NCCL
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = impl->timeout();
      impl->group = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl->store, static_cast<int>(options.rank),
                                                                static_cast<int>(options.world_size), no);
#else
      throw input_error("distributed: this build has no ProcessGroupNCCL (CUDA); train on --device cpu");
#endif
    } else {
      auto go = c10d::ProcessGroupGloo::Options::create(impl->timeout());
      // GLOO_SOCKET_IFNAME picks the interface; a loopback master means a single machine; otherwise the
      // address this host's name resolves to (Gloo's default, as torchrun).
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      const bool loopback = options.master_addr == "localhost" || options.master_addr.rfind("127.", 0) == 0;
      if (ifname && *ifname) {
        go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (loopback) {
        go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      go->threads = 1;  // one collective at a time, in launch order
      impl->group = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, static_cast<int>(options.rank),
                                                                static_cast<int>(options.world_size), go);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    impl->fail("connecting the process group through " + where, e);
  }
  return std::unique_ptr<Communicator>(new Communicator(std::move(impl)));
}

int64_t Communicator::rank() const { return impl_->options.rank; }
int64_t Communicator::world_size() const { return impl_->options.world_size; }
double Communicator::timeout_s() const { return impl_->options.timeout_s; }

void Communicator::broadcast(at::Tensor& tensor, int64_t root) {
  std::vector<at::Tensor> v{tensor};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  WorkPtr w;
  try {
    w = impl_->group->broadcast(v, o);
  } catch (const std::exception& e) {
    impl_->fail("a broadcast", e);
  }
  impl_->wait(w, "a broadcast");
}

void Communicator::all_reduce_sum(at::Tensor& tensor) {
  std::vector<at::Tensor> v{tensor};
  WorkPtr w;
  try {
    w = impl_->group->allreduce(v);
  } catch (const std::exception& e) {
    impl_->fail("an all-reduce", e);
  }
  impl_->wait(w, "an all-reduce");
}

void Communicator::sync_after_rank0(const std::string& key, double timeout_s) {
  const std::string k = "diffuse/done/" + key;
  try {
    if (rank() == 0) {
      impl_->store->set(k, std::vector<uint8_t>{1});
    } else {
      impl_->store->wait({k}, ms(static_cast<int64_t>(timeout_s * 1000.0)));
    }
  } catch (const std::exception& e) {
    impl_->fail("waiting for rank 0 (" + key + ")", e);
  }
}

std::string Communicator::share(const std::string& key, const std::string& value_on_rank0) {
  const std::string k = "diffuse/share/" + key;
  try {
    std::string value = value_on_rank0;
    if (rank() == 0) {
      impl_->store->set(k, std::vector<uint8_t>(value.begin(), value.end()));
    } else {
      std::vector<uint8_t> v = impl_->store->get(k);
      value.assign(v.begin(), v.end());
    }
    // Nobody goes on before all have the value: a rank that then stops on bad input (every rank checks the
    // same shared value) cannot make a slower one fail on a lost connection instead.
    if (impl_->store->add(k + "/read", 1) == world_size()) impl_->store->set(k + "/all", std::vector<uint8_t>{1});
    impl_->store->wait({k + "/all"});
    return value;
  } catch (const std::exception& e) {
    impl_->fail("receiving '" + key + "' from rank 0", e);
  }
}

// --- Bucketed gradient all-reduce -------------------------------------------------------------------

struct GradReducer::State {
  std::mutex mu;
  Communicator::Impl* comm = nullptr;  // outlives every step (the trainer owns both)
  at::Tensor grad;                     // the flat gradient [P]
  std::vector<int64_t> lo, hi;         // bucket b covers grad[lo[b], hi[b])
  std::vector<int64_t> expected, pending;
  std::vector<WorkPtr> works;
  int64_t next = 0;                    // the next bucket to launch
  int64_t early = 0;                   // buckets launched from the backward pass this step
  bool armed = false;                  // between prepare() and finish()
  bool active = true;                  // false once the reducer is gone (hooks stay on the graph nodes)

  // Launches bucket `next` (mean: divide first, then sum); mu is held.
  void launch_next() {
    at::Tensor slice = grad.narrow(0, lo[next], hi[next] - lo[next]);
    slice.div_(static_cast<double>(comm->options.world_size));
    std::vector<at::Tensor> v{slice};
    try {
      works[next] = comm->group->allreduce(v);
    } catch (const std::exception& e) {
      comm->fail("the gradient all-reduce", e);
    }
    ++next;
  }
  // A parameter of bucket b has its gradient in the flat buffer.
  void landed(int64_t b) {
    std::lock_guard<std::mutex> lock(mu);
    if (!active || !armed) return;
    if (--pending[b] > 0) return;
    while (next < static_cast<int64_t>(lo.size()) && pending[next] == 0) {
      launch_next();
      ++early;
    }
  }
};

namespace {
// Runs after AccumulateGrad has added this step's gradient into param.grad (a view of the flat buffer).
class LandedHook : public torch::autograd::FunctionPostHook {
 public:
  LandedHook(std::shared_ptr<GradReducer::State> state, int64_t bucket) : state_(std::move(state)), bucket_(bucket) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    state_->landed(bucket_);
    return outputs;
  }

 private:
  std::shared_ptr<GradReducer::State> state_;
  int64_t bucket_;
};
}  // namespace

GradReducer::GradReducer(Communicator& comm, FlatParameters& flat, const std::vector<at::Tensor>& params,
                         int64_t bucket_numel)
    : state_(std::make_shared<State>()) {
  if (flat.grad_storage() != GradStorage::kPersistent) {
    throw run_error("distributed: the gradient all-reduce needs the persistent flat gradient buffer");
  }
  State& s = *state_;
  s.comm = &comm.impl();
  s.grad = flat.grad();
  // Buckets in reverse parameter order, each a contiguous range of whole parameters of at least
  // bucket_numel elements (the last one may be smaller).
  std::vector<int64_t> bucket_of(params.size());
  int64_t hi = -1, lo = -1;
  for (int64_t i = static_cast<int64_t>(params.size()) - 1; i >= 0; --i) {
    const int64_t off = params[i].storage_offset(), n = params[i].numel();
    if (hi < 0) hi = off + n;
    lo = off;
    bucket_of[i] = static_cast<int64_t>(s.lo.size());
    if (hi - lo >= bucket_numel || i == 0) {
      s.lo.push_back(lo);
      s.hi.push_back(hi);
      hi = -1;
    }
  }
  s.expected.assign(s.lo.size(), 0);
  for (size_t i = 0; i < params.size(); ++i) {
    ++s.expected[bucket_of[i]];
    std::shared_ptr<torch::autograd::Node> acc = torch::autograd::impl::grad_accumulator(params[i]);
    if (!acc) throw run_error("distributed: a parameter does not require a gradient");
    acc->add_post_hook(std::make_unique<LandedHook>(state_, bucket_of[i]));
    keep_alive_.push_back(acc);  // the same AccumulateGrad node (and hook) for every step's graph
  }
  s.works.resize(s.lo.size());
}

GradReducer::~GradReducer() {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->active = false;
}

int64_t GradReducer::num_buckets() const { return static_cast<int64_t>(state_->lo.size()); }
int64_t GradReducer::launched_in_backward() const { return state_->early; }

void GradReducer::prepare() {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->pending = state_->expected;
  state_->next = 0;
  state_->early = 0;
  for (auto& w : state_->works) w.reset();
  state_->armed = true;
}

void GradReducer::finish() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.armed = false;
    // Buckets with parameters that got no gradient this step (unused by the forward pass).
    while (s.next < static_cast<int64_t>(s.lo.size())) s.launch_next();
  }
  for (auto& w : s.works) s.comm->wait(w, "the gradient all-reduce");
}

#else  // no c10d in this build

bool distributed_available() { return false; }

struct Communicator::Impl {};
struct GradReducer::State {};
struct LauncherStore::Impl {};

LauncherStore::LauncherStore(int64_t) {
  throw input_error("distributed: this build of diffuse has no c10d (install libgloo-dev and rebuild); run one process");
}
LauncherStore::~LauncherStore() = default;
int LauncherStore::port() const { return 0; }

Communicator::Communicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Communicator::~Communicator() = default;
std::unique_ptr<Communicator> Communicator::connect(const DistOptions&, const c10::Device&) {
  throw input_error("distributed: this build of diffuse has no c10d (install libgloo-dev and rebuild); run one process");
}
int64_t Communicator::rank() const { return 0; }
int64_t Communicator::world_size() const { return 1; }
double Communicator::timeout_s() const { return 0; }
void Communicator::broadcast(at::Tensor&, int64_t) {}
void Communicator::all_reduce_sum(at::Tensor&) {}
void Communicator::sync_after_rank0(const std::string&, double) {}
std::string Communicator::share(const std::string&, const std::string& v) { return v; }
GradReducer::GradReducer(Communicator&, FlatParameters&, const std::vector<at::Tensor>&, int64_t) {}
GradReducer::~GradReducer() = default;
int64_t GradReducer::num_buckets() const { return 0; }
int64_t GradReducer::launched_in_backward() const { return 0; }
void GradReducer::prepare() {}
void GradReducer::finish() {}

#endif

}  // namespace diffuse
