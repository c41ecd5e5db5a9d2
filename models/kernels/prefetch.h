// Fetching the next work item's data into L2 while the current one computes, for the kernels.
#pragma once

#include <cstdint>

// Fetches [next, end) into L2 over `steps` calls to Step, a line whenever its share of the
// steps has passed (several at once where there are more lines than steps). An even pace: the
// same prefetches issued in a burst at a matmul panel's start slowed the FMAs behind them
// (benchmarks/NOTES.md).
struct Prefetcher {
  const char* next;
  const char* end;
  int64_t lines, steps, credit = 0;

  // `bytes` from `start` (null: nothing) over `steps` calls to Step.
  static Prefetcher Over(const void* start, int64_t bytes, int64_t steps) {
    const char* first = static_cast<const char*>(start);
    return {first, first ? first + bytes : nullptr, (bytes + 63) / 64, steps > 0 ? steps : 1};
  }

  void Step() {
    for (credit += lines; credit >= steps && next < end; credit -= steps, next += 64) {
      __builtin_prefetch(next, /*rw=*/0, /*locality=*/2);
    }
  }
};
