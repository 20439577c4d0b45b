#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>

namespace kvagent {

struct ThreadPool::Job {
  Job(size_t n, int parts, const RangeFn& fn) : n(n), parts(parts), fn(fn) {}
  const size_t n;
  const int parts;
  const RangeFn& fn;  // the caller's: valid until `left` reaches 0 and the caller returns
  std::atomic<int> next{0};
  std::mutex mu;
  std::condition_variable done;
  int left = 0;  // ranges not yet finished (guarded by mu)

  // Claims and runs ranges until none is left to claim.
  void Work() {
    for (int p; (p = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      const size_t begin = n * static_cast<size_t>(p) / static_cast<size_t>(parts);
      const size_t end = n * (static_cast<size_t>(p) + 1) / static_cast<size_t>(parts);
      fn(begin, end, p);
      std::lock_guard<std::mutex> l(mu);
      if (--left == 0) done.notify_all();
    }
  }
};

ThreadPool::ThreadPool(int workers) {
  threads_.reserve(static_cast<size_t>(std::max(workers, 0)));
  for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

ThreadPool& ThreadPool::Shared() {
  static ThreadPool pool(std::max(1, static_cast<int>(std::thread::hardware_concurrency())) - 1);
  return pool;
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ with nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job->Work();  // a job already finished by others finds nothing to claim
  }
}

void ThreadPool::ParallelFor(size_t n, int parts, const RangeFn& fn) {
  if (n == 0) return;
  parts = static_cast<int>(std::min<size_t>(static_cast<size_t>(std::max(parts, 1)), n));
  if (parts == 1 || threads_.empty()) {
    if (parts == 1) return fn(0, n, 0);
    for (int p = 0; p < parts; ++p) fn(n * p / parts, n * (p + 1) / parts, p);
    return;
  }
  auto job = std::make_shared<Job>(n, parts, fn);
  job->left = parts;
  const int helpers = std::min(parts - 1, workers());
  {
    std::lock_guard<std::mutex> l(mu_);
    for (int i = 0; i < helpers; ++i) queue_.push_back(job);
  }
  if (helpers == 1) cv_.notify_one(); else cv_.notify_all();
  job->Work();
  std::unique_lock<std::mutex> l(job->mu);
  job->done.wait(l, [&] { return job->left == 0; });
}

}  // namespace kvagent
