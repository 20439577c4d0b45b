// Fork-join helper of LatentIndex::Search (internal to src/index).
#pragma once

#include <cstddef>
#include <thread>
#include <vector>

namespace kvagent::index_internal {

// Runs fn(begin, end, thread_index) over [0, n) split into `threads` contiguous ranges; the
// calling thread takes the first range.
template <typename Fn>
void ParallelFor(size_t n, int threads, Fn fn) {
  if (threads <= 1 || n < 2) {
    fn(size_t{0}, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back([&, t] { fn(n * t / threads, n * (t + 1) / threads, t); });
  }
  fn(0, n / threads, 0);
  for (auto& th : pool) th.join();
}

}  // namespace kvagent::index_internal
