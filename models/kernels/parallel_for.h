// Work sharing for the kernels: XLA's intra-op threads, as the FFI hands them over.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

// Runs fn(item) for every item in [0, items): the calling thread and XLA's
// intra-op pool threads take items from a counter until none are left. Helpers
// that start late find nothing to do, so the caller waits only for items.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Fn fn) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto drain = [=] {
    int64_t finished = 0;
    for (int64_t i; (i = progress->next.fetch_add(1)) < items; ++finished) fn(i);
    progress->done.fetch_add(finished);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([drain] { drain(); });
  drain();
  while (progress->done.load() < items) std::this_thread::yield();
}
