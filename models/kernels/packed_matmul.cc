// A matmul for XLA:CPU at decode shapes: a few rows of activations against a
// weight streamed from memory, y [rows, n] = x [rows, k] @ W [k, n].
//
// Why a kernel: at 8-32 rows XLA:CPU's dot costs its weight reads plus its
// FLOPs, as if the two took turns; a step then costs far more than its bytes.
// Here W is stored once, at load time, as column panels [ceil(n/48), k, 48]:
// each panel is one contiguous stream the hardware prefetcher follows, and its
// 48 columns stay in registers (3 vectors of 16) while every k is read once.
// The cores take panels from a shared counter, so both stream and compute at
// once. The panel is read once per group of 8 rows, from L2 (all but each
// core's first panel of a call): while a core computes one panel it prefetches
// the next one it will take into L2, so at 16-32 rows the weight streams in
// while the FMAs run instead of in turns (each panel's first group of rows
// would otherwise wait on memory and the others on the FMAs).
//
// Each output element is one sum over k in a fixed order, whatever the number
// of rows or how they are grouped, so a row's result does not depend on which
// other rows share the call (batch invariance).
//
// The panels hold float32, bfloat16 or int8 weights; each is widened to float32
// as it is loaded and the sums run in float32 (x stays float32), so a narrower
// weight costs fewer bytes to stream and nothing else. int8 panels come with a
// float32 scale per column (output channel) and group of 64 inputs: each int8
// weight is widened and times its scale as it is loaded (once per group of rows).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "parallel_for.h"
#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 48;  // columns per panel: 3 vectors of 16 floats
constexpr int64_t kRowBlock = 64;  // rows per work item: bounds a prompt's item size
constexpr int64_t kGroup = 64;  // inputs per int8 scale, as models/layers.quantize groups them

// Fetches [next, end) into L2 a few cache lines per step, spread over a panel's tiles.
struct Prefetcher {
  const char* next;
  const char* end;
  int64_t lines_per_step;

  void Step() {
    for (int64_t j = 0; j < lines_per_step && next < end; ++j, next += 64) {
      __builtin_prefetch(next, /*rw=*/0, /*locality=*/2);
    }
  }
};

// R rows of x (row stride k) against one panel [k, 48]; writes `cols` <= 48 columns.
// int8 panels: `scales` [ceil(k / 64), 48], the panel's scales by group of inputs.
template <int R, typename W>
void Tile(const float* x, const W* panel, const float* scales, int64_t k, float* y, int64_t n,
          int64_t cols, Prefetcher& ahead) {
  F16 acc[R][3] = {};
  for (int64_t i = 0; i < k; ++i) {
    const W* w = panel + i * kPanel;
    F16 w0 = Widen(w), w1 = Widen(w + 16), w2 = Widen(w + 32);
    if constexpr (std::is_same_v<W, int8_t>) {
      const float* s = scales + (i / kGroup) * kPanel;
      w0 *= Load(s), w1 *= Load(s + 16), w2 *= Load(s + 32);
    }
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * k + i];
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
      acc[r][2] += xv * w2;
    }
    ahead.Step();
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * n, acc[r], cols * sizeof(float));
}

// Rows [0, rows) of x against one panel, 8 at a time, then 4, 2, 1, prefetching
// `next_panel` (null: none) over the tiles.
template <typename W>
void Panel(const float* x, int64_t rows, const W* panel, const W* next_panel,
           const float* scales, int64_t k, float* y, int64_t n, int64_t cols) {
  const int64_t tiles = rows / 8 + (rows % 8 >= 4) + (rows % 4 >= 2) + rows % 2;
  const int64_t panel_lines = (k * kPanel * sizeof(W) + 63) / 64;
  const char* next = reinterpret_cast<const char*>(next_panel);
  Prefetcher ahead{next, next ? next + panel_lines * 64 : nullptr,
                   (panel_lines + tiles * k - 1) / (tiles * k)};
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) Tile<8>(x + r * k, panel, scales, k, y + r * n, n, cols, ahead);
  if (r + 4 <= rows) Tile<4>(x + r * k, panel, scales, k, y + r * n, n, cols, ahead), r += 4;
  if (r + 2 <= rows) Tile<2>(x + r * k, panel, scales, k, y + r * n, n, cols, ahead), r += 2;
  if (r < rows) Tile<1>(x + r * k, panel, scales, k, y + r * n, n, cols, ahead);
}

// x [rows, k]; panels [p, k, 48] with n <= 48 p (columns past n are padding);
// scales [p, ceil(k / 64), 48] for int8 panels, [0] otherwise; out [rows, n].
template <typename W>
void Multiply(ffi::ThreadPool& pool, const float* x, const W* panels, const float* scales,
              int64_t rows, int64_t k, int64_t num_panels, int64_t n, float* out) {
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t items = num_panels * row_blocks;
  const int64_t groups = (k + kGroup - 1) / kGroup;

  // Items run panel by panel, row blocks within; `next` is this thread's next item.
  auto compute = [=](int64_t item, int64_t next) {
    const int64_t p = item / row_blocks, first_row = (item % row_blocks) * kRowBlock;
    const int64_t next_p = next < items ? next / row_blocks : p;
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    Panel(x + first_row * k, std::min(kRowBlock, rows - first_row), panels + p * k * kPanel,
          next_p != p ? panels + next_p * k * kPanel : nullptr,
          scales ? scales + p * groups * kPanel : nullptr, k, out + first_row * n + p * kPanel, n,
          cols);
  };
  ParallelFor(pool, items, compute);
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer panels,
                        ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), pd = panels.dimensions(), od = out->dimensions();
  const auto type = panels.element_type();
  const bool int8 = type == ffi::DataType::S8;
  if (xd.size() != 2 || pd.size() != 3 || od.size() != 2 || pd[2] != kPanel || pd[1] != xd[1] ||
      od[0] != xd[0] || od[1] > pd[0] * kPanel || od[1] <= (pd[0] - 1) * kPanel ||
      scales.element_count() != (int8 ? pd[0] * ((pd[1] + kGroup - 1) / kGroup) * kPanel : 0)) {
    return ffi::Error::InvalidArgument(
        "packed_matmul: expected x [rows, k], panels [p, k, 48], scales [p, ceil(k / 64), 48] "
        "(int8 panels) or [0] (others) and out [rows, n] with 48 (p - 1) < n <= 48 p");
  }
  const int64_t rows = xd[0], k = xd[1], num_panels = pd[0], n = od[1];
  const float* x_data = x.typed_data();
  float* out_data = out->typed_data();
  const void* data = panels.untyped_data();
  switch (type) {
    case ffi::DataType::F32:
      Multiply(pool, x_data, static_cast<const float*>(data), nullptr, rows, k, num_panels, n,
               out_data);
      break;
    case ffi::DataType::BF16:
      Multiply(pool, x_data, static_cast<const uint16_t*>(data), nullptr, rows, k, num_panels, n,
               out_data);
      break;
    case ffi::DataType::S8:
      Multiply(pool, x_data, static_cast<const int8_t*>(data), scales.typed_data(), rows, k,
               num_panels, n, out_data);
      break;
    default:
      return ffi::Error::InvalidArgument("packed_matmul: panels must be float32, bfloat16 or int8");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloverPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::AnyBuffer>()          // panels
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scales
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
