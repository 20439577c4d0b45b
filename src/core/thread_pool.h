// ThreadPool: persistent worker threads for fork-join loops of the CPU kernels (RoPE rotation; the
// latent index's search can use it too), instead of spawning std::threads on every call.
//
// ParallelFor(n, parts, fn) splits [0, n) into `parts` contiguous ranges and runs fn(begin, end,
// part) once per range; the calling thread works on the ranges too and the call returns when all
// have run. Ranges are claimed dynamically, so a call never waits for a busy worker: with every
// worker occupied (other callers, or a ParallelFor nested inside fn) the caller runs the ranges
// itself. `part` (0 <= part < parts) identifies the range, e.g. for per-range scratch.
//
// Thread-safety: ParallelFor may be called from any number of threads at once, and from inside
// fn. fn must not throw. Shared() lives until the process exits (its workers are detached at
// exit by the destructor, which joins them).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvagent {

class ThreadPool {
 public:
  // `workers` >= 0 threads (0: every call runs on its caller).
  explicit ThreadPool(int workers);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // The process-wide pool: hardware_concurrency() - 1 workers, started on first use.
  static ThreadPool& Shared();

  int workers() const { return static_cast<int>(threads_.size()); }

  using RangeFn = std::function<void(size_t begin, size_t end, int part)>;
  // parts is capped at n; parts <= 1 or n <= 1 runs fn(0, n, 0) on the caller (nothing for n = 0).
  void ParallelFor(size_t n, int parts, const RangeFn& fn);

 private:
  struct Job;
  void WorkerLoop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;  // one entry per helper wanted
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvagent
