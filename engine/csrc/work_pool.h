// One pool of worker threads for every parallel kernel of both CPU libraries (cpu_kernels.cpp, quant_kernels.cpp),
// in place of OpenMP regions.
//
// An OpenMP region ends in a join that waits for every thread of the team, also one the OS has not scheduled
// yet: on a busy host one late thread stalls the whole region by a scheduler time slice. And libgomp's idle
// threads spin a fixed count after each region (GOMP_SPINCOUNT; 30,000 pauses are ~0.75 ms on Zen 4), so at one
// stream they never sleep between decode steps and hold a core the server's event loop needs for the token just
// made. Here the caller works through a job's chunks with whichever helpers show up and waits only for chunks
// already taken (a late helper costs nothing: the worst case is the caller doing the work alone); helpers spin
// between the kernels of a step, and ``park()`` (the model runner, at the end of each step) sends them to sleep
// at once. Helpers that are not parked sleep after ``KUBEINFER_POOL_SPIN_US`` (default 200 us) without a job.
// Where torch's own OpenMP threads run much of a step (a dense model's linears), the kernels' jobs run in
// OpenMP regions instead (``ki_work_pool_use_openmp``): one set of threads either way.
//
// Each library holds a pool; ``kq_use_work_pool`` points the quantized kernels at cpu_kernels' pool, so one
// process has one set of helpers (two sets would spin against each other on the same cores).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#endif

namespace work_pool {
namespace {  // internal linkage: each library has a pool of its own, until it is pointed at another's

using ChunkFn = void (*)(const void* ctx, int64_t chunk);
using RunFn = void (*)(ChunkFn fn, const void* ctx, int64_t chunks, int threads);

constexpr int64_t MAX_CHUNKS = 0xffff;

class WorkPool {
 public:
  WorkPool() {
    const char* spin = std::getenv("KUBEINFER_POOL_SPIN_US");
    spin_ns_ = (spin != nullptr ? std::atoll(spin) : 200) * 1000;
  }

  // fn(ctx, c) for every chunk c in [0, chunks) (at most MAX_CHUNKS) on up to `threads` threads, the caller's
  // included; returns when every chunk is done.
  void run(ChunkFn fn, const void* ctx, int64_t chunks, int threads) {
    const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, chunks - 1));
    if (helpers <= 0) {
      for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(call_mutex_);
    start_helpers(helpers);
    fn_ = fn;
    ctx_ = ctx;
    wanted_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (++generation_) & 0xffffffffu;
    // state: generation (32 bits) | total chunks (16) | next chunk (16); claims compare the whole word
    // seq_cst with the helpers' sleepers_ increment and re-check: neither side can miss the other
    state_.store(gen << 32 | static_cast<uint64_t>(chunks) << 16);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    work(gen);
    while (done_.load(std::memory_order_acquire) < chunks) pause();
  }

  // Spinning helpers go to sleep now (until the next job) instead of at the end of their spin.
  void park() {
    std::lock_guard<std::mutex> between_jobs(call_mutex_);
    parked_.store(generation_ & 0xffffffffu, std::memory_order_release);
  }

 private:
  static void pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }

  void work(uint64_t gen) {
    uint64_t v = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t total = (v >> 16) & 0xffff, next = v & 0xffff;
      if ((v >> 32) != gen || next >= total) return;
      if (!state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      fn_(ctx_, static_cast<int64_t>(next));  // the caller waits for this chunk: fn_/ctx_ are this job's
      done_.fetch_add(1, std::memory_order_release);
      v = state_.load(std::memory_order_acquire);
    }
  }

  void start_helpers(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { helper(id); });
      threads_.back().detach();
    }
  }

  void helper(int id) {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "kubeinfer-pool");  // (15 characters at most)
#endif
    uint64_t seen = state_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t gen = seen;
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns_);
      while ((gen = state_.load(std::memory_order_acquire) >> 32) == seen &&
             parked_.load(std::memory_order_acquire) != seen && std::chrono::steady_clock::now() < spin_until)
        for (int i = 0; i < 64; ++i) pause();
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return (state_.load() >> 32) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        gen = state_.load(std::memory_order_acquire) >> 32;
      }
      seen = gen;
      if (id < wanted_.load(std::memory_order_relaxed)) work(gen);
    }
  }

  std::mutex call_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0}, wanted_{0};
  std::atomic<uint64_t> parked_{~0ull};
  uint64_t generation_ = 0;
  ChunkFn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t spin_ns_ = 200000;
};

WorkPool& local_pool() {
  static WorkPool* pool = new WorkPool();  // never destroyed: helpers may still be asleep at exit
  return *pool;
}

// Jobs in an OpenMP region instead (the same chunks, claimed the same way): for a model whose other work
// (torch's dense linears) runs on torch's OpenMP threads, which would otherwise spin against the pool's helpers.
std::atomic<bool>& on_openmp() {
  static std::atomic<bool> on{false};
  return on;
}

void run_openmp(ChunkFn fn, const void* ctx, int64_t chunks, int threads) {
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, chunks)))
  for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) fn(ctx, c);
}

void run_here(ChunkFn fn, const void* ctx, int64_t chunks, int threads) {
  if (on_openmp().load(std::memory_order_relaxed) && threads > 1 && chunks > 1) run_openmp(fn, ctx, chunks, threads);
  else local_pool().run(fn, ctx, chunks, threads);
}

// The pool this library's kernels run on.
std::atomic<RunFn>& runner() {
  static std::atomic<RunFn> run{&run_here};
  return run;
}

// body(i) for every i in [0, n) on up to `threads` threads; i's are claimed one at a time, in order (as OpenMP's
// schedule(dynamic, 1)), in groups when n is over MAX_CHUNKS.
template <class Body>
void parallel_for(int64_t n, int threads, Body&& body) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  using B = std::remove_reference_t<Body>;
  struct Job {
    B* body;
    int64_t n, per_chunk;
  };
  const int64_t per_chunk = (n + MAX_CHUNKS - 1) / MAX_CHUNKS;
  const Job job{&body, n, per_chunk};
  runner().load(std::memory_order_relaxed)(
      [](const void* ctx, int64_t chunk) {
        const Job& j = *static_cast<const Job*>(ctx);
        for (int64_t i = chunk * j.per_chunk, end = std::min(j.n, i + j.per_chunk); i < end; ++i) (*j.body)(i);
      },
      &job, (n + per_chunk - 1) / per_chunk, threads);
}

// body(begin, end) over `threads` contiguous ranges of [0, n) (as schedule(static): range t is the same rows
// whichever thread takes it, so a result never depends on the threads).
template <class Body>
void parallel_ranges(int64_t n, int threads, Body&& body) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  parallel_for(parts, threads, [&](int64_t t) { body(n * t / parts, n * (t + 1) / parts); });
}

}  // namespace
}  // namespace work_pool
