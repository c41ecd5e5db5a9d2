// Work sharing for the kernels: XLA's intra-op threads, as the FFI hands them over.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

// Runs fn(item) for every item in [0, items): the calling thread and XLA's
// intra-op pool threads take items from a counter until none are left. Helpers
// that start late find nothing to do, so the caller waits only for items.
// Where fn also takes a second argument, each thread claims its next item one
// ahead and passes it (items where there is none), so fn can prefetch that
// item's data while it works on this one.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Fn fn) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto drain = [=] {
    int64_t finished = 0;
    for (int64_t i = progress->next.fetch_add(1); i < items; ++finished) {
      if constexpr (std::is_invocable_v<Fn, int64_t, int64_t>) {
        const int64_t next = std::min(progress->next.fetch_add(1), items);
        fn(i, next);
        i = next;
      } else {
        fn(i);
        i = progress->next.fetch_add(1);
      }
    }
    progress->done.fetch_add(finished);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([drain] { drain(); });
  drain();
  while (progress->done.load() < items) std::this_thread::yield();
}
