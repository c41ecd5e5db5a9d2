// A matmul for XLA:CPU at decode shapes: a few rows of activations against a
// weight streamed from memory, y [rows, n] = x [rows, k] @ W [k, n].
//
// Why a kernel: at 8-32 rows XLA:CPU's dot costs its weight reads plus its
// FLOPs, as if the two took turns; a step then costs far more than its bytes.
// Here W is stored once, at load time, as column panels of 48 columns: each
// panel is one contiguous stream the hardware prefetcher follows, and its 48
// columns stay in registers (3 vectors of 16, or 6 of 8) while every k is read once. The
// cores take panels from a shared counter, so both stream and compute at once.
// The panel is read once per tile of rows (kTileRows), from L2 (all but each core's
// first panel of a call): while a core computes one panel it prefetches the
// next one it will take into L2, so at 16-32 rows the weight streams in while
// the FMAs run instead of in turns (each panel's first group of rows would
// otherwise wait on memory and the others on the FMAs).
//
// Each output element is one sum over k in a fixed order, whatever the number
// of rows or how they are grouped, so a row's result does not depend on which
// other rows share the call (batch invariance).
//
// A gated MLP's gate and up weights can come as pairs of panels, the gate's 48 columns and
// then up's: an item multiplies both and writes silu(gate) * up, so XLA neither writes both
// products nor reads them back for the activation.
//
// The panels hold float32, bfloat16 or int8 weights; each is widened to float32
// as it is loaded and the sums run in float32 (x stays float32), so a narrower
// weight costs fewer bytes to stream and nothing else. Float32 and int8 panels
// are [ceil(n / 48), k, 48]; int8 ones come with a float32 scale per column
// (output channel) and group of 64 inputs, each int8 weight widened and times
// its scale as it is loaded (once per group of rows). bfloat16 panels are
// [ceil(n / 48), ceil(k / 32) * 16, 96]: inputs in pairs, 2i and 2i+1 of each
// column side by side (the order AMX tiles take; widening a pair costs one
// shift and one mask), zeros past k.
//
// Where the CPU has AMX tiles (Sapphire Rapids and later) and the caller asks for
// them, bfloat16 panels are multiplied on the tiles instead (TilePanel), 16 rows
// at a time, several times the FMAs' rate: the tiles multiply bfloat16 by
// bfloat16, so x goes in as two bfloat16 parts (hi rounded to nearest even as
// XLA's convert rounds, lo what hi leaves; SplitBfloat16), and the exact products
// of both are summed in float32: x keeps 16 bits of mantissa, where rounding it
// to bfloat16 alone (as oneDNN's bfloat16 matmuls do) cost a measurable share of
// the tokens' agreement with float32 (benchmarks/NOTES.md).
// float32 panels can go on the tiles too, each value as three bfloat16 parts
// (MultiplySplitOnTiles): where many rows share a panel, as a prompt's do.
// Again one fixed order per output element whatever the rows, so batch
// invariance holds.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel_for.h"
#include "prefetch.h"
#include "vectors.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define FLOVER_TILES 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 48;  // columns per panel: 3 vectors of 16 floats (6 of 8)
constexpr int64_t kRowBlock = 64;  // rows per work item: bounds a prompt's item size
constexpr int64_t kGroup = 64;  // inputs per int8 scale, as models/layers.quantize groups them
constexpr int64_t kChunk = 64;  // inputs per chunk where several tiles of rows share a panel (Panel)

constexpr int64_t kPairBlock = 32;  // bfloat16 panels' inputs are padded to a multiple of this

// Values per panel of k inputs.
template <typename W>
constexpr int64_t PanelSize(int64_t k) {
  return kPanel * (std::is_same_v<W, uint16_t> ? (k + kPairBlock - 1) / kPairBlock * kPairBlock : k);
}

// R rows of x (row stride k) against inputs [i0, i1) of one panel, added to the rows' 48 sums
// in `sums` (row stride 48), which stay in registers meanwhile. int8 panels: `scales`
// [ceil(k / 64), 48], the panel's scales by group of inputs. i0 is even for bfloat16 pairs.
constexpr int kVectors = kPanel / kLanes;  // a panel row: 3 vectors with AVX-512, 6 with AVX2

template <int R, typename W>
void Tile(const float* x, const W* panel, const float* scales, int64_t k, int64_t i0, int64_t i1,
          float* sums, Prefetcher& ahead) {
  FV acc[R][kVectors];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < kVectors; ++c) acc[r][c] = Load(sums + r * kPanel + kLanes * c);
  }
  if constexpr (std::is_same_v<W, uint16_t>) {  // bfloat16 pairs: inputs i and i + 1
    // Every row's even input, then every row's odd one: each sum adds them in that order, and
    // only one input's widened values take registers at a time.
    for (int64_t i = i0; i < i1; i += 2) {
      const bool has_odd = i + 1 < k;
      for (int odd = 0; odd < 2; ++odd) {
        FV wide[kVectors];
        for (int c = 0; c < kVectors; ++c) wide[c] = WidenPair(panel + i * kPanel + 2 * kLanes * c, odd);
        for (int r = 0; r < R; ++r) {
          const float xv = odd ? (has_odd ? x[r * k + i + 1] : 0.0f) : x[r * k + i];
          for (int c = 0; c < kVectors; ++c) acc[r][c] += xv * wide[c];
        }
      }
      ahead.Step();
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const W* w = panel + i * kPanel;
      FV wide[kVectors];
      for (int c = 0; c < kVectors; ++c) wide[c] = Widen(w + kLanes * c);
      if constexpr (std::is_same_v<W, int8_t>) {
        const float* s = scales + (i / kGroup) * kPanel;
        for (int c = 0; c < kVectors; ++c) wide[c] *= Load(s + kLanes * c);
      }
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * k + i];
        for (int c = 0; c < kVectors; ++c) acc[r][c] += xv * wide[c];
      }
      ahead.Step();
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < kVectors; ++c) Store(sums + r * kPanel + kLanes * c, acc[r][c]);
  }
}

// Rows per tile: AVX-512's 32 registers hold 8 rows' sums (3 vectors each); AVX2's 16 hold 2
// rows' (6 each). Measured on AVX2 (benchmarks/NOTES.md): 4 rows of half a panel's columns, or
// 4 rows of all, ran slower.
constexpr int kTileRows = kVectors <= 3 ? 8 : 2;

// Rows [0, rows) of x against inputs [i0, i1) of one panel, kTileRows at a time, then the rest
// in tiles of halving size (4, 2, 1); returns the tiles it takes (computing none where `ahead`
// is null: a count only).
template <typename W>
int64_t Tiles(const float* x, int64_t rows, const W* panel, const float* scales, int64_t k,
              int64_t i0, int64_t i1, float (*sums)[kPanel], Prefetcher* ahead) {
  int64_t r = 0, tiles = 0;
  auto take = [&](auto size) {
    constexpr int R = decltype(size)::value;
    if (ahead) Tile<R>(x + r * k, panel, scales, k, i0, i1, sums[r], *ahead);
    r += R, ++tiles;
  };
  while (r + kTileRows <= rows) take(std::integral_constant<int, kTileRows>{});
  if constexpr (kTileRows > 4) if (r + 4 <= rows) take(std::integral_constant<int, 4>{});
  if constexpr (kTileRows > 2) if (r + 2 <= rows) take(std::integral_constant<int, 2>{});
  if constexpr (kTileRows > 1) if (r < rows) take(std::integral_constant<int, 1>{});
  return tiles;
}

// Rows [0, rows) (at most kRowBlock) of x against one panel, into sums [rows, 48], prefetching
// `next_panel` (null: none) over the tiles. Where several tiles of rows read the panel, they
// take its inputs a chunk at a time (kChunk), each tile's sums put aside between chunks: every
// tile but the first reads the chunk from L1, where a whole panel (tens to hundreds of kB) would
// come from L2. Each sum still runs over k in order, so the chunks change no bit of the result.
template <typename W>
void Panel(const float* x, int64_t rows, const W* panel, const W* next_panel,
           const float* scales, int64_t k, float (*sums)[kPanel]) {
  const int64_t tiles = Tiles<W>(x, rows, panel, scales, k, 0, 0, sums, nullptr);
  const int64_t steps = tiles * (std::is_same_v<W, uint16_t> ? (k + 1) / 2 : k);
  Prefetcher ahead = Prefetcher::Over(next_panel, PanelSize<W>(k) * sizeof(W), steps);
  std::fill(sums[0], sums[rows], 0.0f);
  const int64_t chunk = tiles > 1 ? kChunk : k;
  for (int64_t i0 = 0; i0 < k; i0 += chunk) {
    Tiles<W>(x, rows, panel, scales, k, i0, std::min(k, i0 + chunk), sums, &ahead);
  }
}

#if FLOVER_TILES
// AMX: 8 tile registers of up to 16 rows x 64 bytes. Here C 0-2 are the 16 x 48 float32
// sums of up to 16 rows, B 3-5 the panel's next 32 inputs as three 16-column tiles (their
// pairs as the panel stores them), A 6 the rows' next 32 inputs in bfloat16.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// All 8 tiles, 64 bytes a row: B tiles 3-5 of 16 rows, the others of `rows`.
void ConfigureTiles(int rows) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = (t >= 3 && t <= 5) ? 16 : rows;
  }
  _tile_loadconfig(&config);
}

// Rows [0, rows) (at most kRowBlock) of x (two bfloat16 parts [rows, k_pad], row stride k_pad,
// `x_part` apart) against one bfloat16 panel on the tiles, 16 rows at a time, into sums
// [rows, 48], prefetching `next_panel` (null: none) over all of them.
void TilePanel(const uint16_t* x, int64_t x_part, int64_t rows, const uint16_t* panel,
               const uint16_t* next_panel, int64_t k_pad, float (*sums)[kPanel]) {
  const int64_t steps = k_pad / kPairBlock;
  Prefetcher ahead = Prefetcher::Over(next_panel, k_pad * kPanel * sizeof(uint16_t),
                                      steps * ((rows + 15) / 16));
  constexpr int64_t b_stride = 2 * kPanel * sizeof(uint16_t);  // a pair of inputs per tile row
  int configured = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, rows - r0));
    if (m != configured) ConfigureTiles(m), configured = m;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t s = 0; s < steps; ++s) {
      const uint16_t* b = panel + s * kPairBlock * kPanel;
      const uint16_t* a = x + r0 * k_pad + s * kPairBlock;
      _tile_loadd(3, b, b_stride);
      _tile_loadd(4, b + 32, b_stride);
      _tile_loadd(5, b + 64, b_stride);
      _tile_loadd(6, a, k_pad * sizeof(uint16_t));
      _tile_loadd(7, a + x_part, k_pad * sizeof(uint16_t));
      _tile_dpbf16ps(0, 6, 3);
      _tile_dpbf16ps(1, 6, 4);
      _tile_dpbf16ps(2, 6, 5);
      _tile_dpbf16ps(0, 7, 3);
      _tile_dpbf16ps(1, 7, 4);
      _tile_dpbf16ps(2, 7, 5);
      ahead.Step();
    }
    _tile_stored(0, sums[r0], kPanel * sizeof(float));
    _tile_stored(1, sums[r0] + 16, kPanel * sizeof(float));
    _tile_stored(2, sums[r0] + 32, kPanel * sizeof(float));
  }
  _tile_release();
}

// At least n values of v's storage, starting on a cache line: a tile row split over two lines
// costs two loads, which more than halves the tiles' speed.
template <typename T>
T* CacheAligned(std::vector<T>& v, size_t n) {
  v.resize(n + 64 / sizeof(T));
  const uintptr_t address = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((address + 63) / 64 * 64);
}

// Whether this process may use the tiles (Linux grants them on request, once per process).
bool TilesPermitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
  return permitted;
}
#else
bool TilesPermitted() { return false; }
#endif

// Items run panel by panel, row blocks within; `next` is a thread's next item. Gated panels
// come in pairs, a gated MLP's gate and up for the same 48 columns, and an item takes both.
template <typename W>
struct Items {
  const W* panels;
  int64_t rows, num_panels, panel_size;
  bool gated;
  int64_t row_block = kRowBlock;  // rows per item

  int64_t per_item() const { return gated ? 2 : 1; }
  int64_t row_blocks() const { return (rows + row_block - 1) / row_block; }
  int64_t count() const { return num_panels / per_item() * row_blocks(); }
  int64_t columns(int64_t item) const { return item / row_blocks(); }  // which 48 of the outputs
  int64_t panel(int64_t item) const { return columns(item) * per_item(); }  // its (first) panel
  int64_t first_row(int64_t item) const { return item % row_blocks() * row_block; }
  int64_t rows_of(int64_t item) const { return std::min(row_block, rows - first_row(item)); }
  // The panel to prefetch: null where the next item reads this one.
  const W* next_panel(int64_t item, int64_t next) const {
    return next < count() && columns(next) != columns(item) ? panels + panel(next) * panel_size
                                                            : nullptr;
  }
};

// gate = silu(gate) * up = gate / (1 + e^-gate) * up, over one row's 48 columns.
inline void SiluTimesUp(float* gate, const float* up) {
  for (int c = 0; c < kVectors; ++c) {
    const FV g = Load(gate + kLanes * c);
    Store(gate + kLanes * c, g / (1.0f + Exp<FV, IV>(-g)) * Load(up + kLanes * c));
  }
}

// Every item: multiply(first_row, rows, panel, next_panel, sums) puts rows [first_row, + rows)
// of x times panel `panel` into sums [rows, 48], prefetching next_panel (null: none); then
// write(columns, first_row, rows, sums) takes the item's sums (of its 48 output columns, block
// `columns`). A gated item's sums are silu(its gate's) * its up's, per element, so a row's
// result still depends on that row alone.
template <typename W, typename MultiplyPanel, typename Write>
void RunItems(ffi::ThreadPool& pool, const Items<W>& items, MultiplyPanel multiply, Write write) {
  ParallelFor(pool, items.count(), [=](int64_t item, int64_t next) {
    const int64_t first_row = items.first_row(item), rows = items.rows_of(item);
    const int64_t p = items.panel(item);
    alignas(64) float sums[kRowBlock][kPanel];
    if (!items.gated) {
      multiply(first_row, rows, p, items.next_panel(item, next), sums);
    } else {
      alignas(64) float up[kRowBlock][kPanel];
      multiply(first_row, rows, p, items.panels + (p + 1) * items.panel_size, sums);
      multiply(first_row, rows, p + 1, items.next_panel(item, next), up);
      for (int64_t r = 0; r < rows; ++r) SiluTimesUp(sums[r], up[r]);
    }
    write(items.columns(item), first_row, rows, sums);
  });
}

// x [rows, k]; panels [p, ..] (gated: 2 per 48 output columns); scales [p, ceil(k / 64), 48]
// for int8 panels, [0] otherwise. Each item's sums go to `write` (RunItems). On the FMAs.
template <typename W, typename Write>
void Multiply(ffi::ThreadPool& pool, const float* x, const W* panels, const float* scales,
              int64_t rows, int64_t k, int64_t num_panels, bool gated, Write write) {
  const Items<W> items{panels, rows, num_panels, PanelSize<W>(k), gated};
  const int64_t groups = (k + kGroup - 1) / kGroup;
  RunItems(pool, items, [=](int64_t first_row, int64_t rows, int64_t p, const W* next,
                            float (*sums)[kPanel]) {
    Panel(x + first_row * k, rows, panels + p * items.panel_size, next,
          scales ? scales + p * groups * kPanel : nullptr, k, sums);
  }, write);
}

#if FLOVER_TILES
// float32 bits rounded to bfloat16's, to nearest even (a NaN stays a NaN), as XLA's convert
// rounds: one value's or a vector's.
template <typename U>
inline U NearestBfloat16(U bits, U is_nan) {
  const U nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  return is_nan ? (bits >> 16) | 0x40 : nearest;
}

// n floats as two bfloat16 parts: hi, each rounded to nearest even as XLA's convert rounds, and
// lo, what hi leaves (x - hi is exact) rounded so; 0 where hi is not finite. hi + lo keeps 16 of
// x's 24 bits of mantissa: on the tiles x loses next to nothing, and the sums' error is the
// weights' bfloat16 rounding, as on the FMAs.
inline void SplitBfloat16(const float* x, uint16_t* hi, uint16_t* lo, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const FV v = Load(x + i);
    const UV top = NearestBfloat16<UV>(BitCast<UV>(v), (UV)(v != v));
    const FV rest = v - BitCast<FV>(top << 16);
    const UV bottom = NearestBfloat16<UV>(BitCast<UV>(rest), (UV)(rest != rest));
    const UV finite = (UV)((top & 0x7F80) != 0x7F80);
    *reinterpret_cast<BfV*>(hi + i) = __builtin_convertvector(top, BfV);
    *reinterpret_cast<BfV*>(lo + i) = __builtin_convertvector(bottom & finite, BfV);
  }
  for (; i < n; ++i) {
    uint32_t bits, rest_bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    const uint32_t top = NearestBfloat16<uint32_t>(bits, x[i] != x[i]), top_bits = top << 16;
    float top_value;
    std::memcpy(&top_value, &top_bits, sizeof(top_value));
    const float rest = x[i] - top_value;
    std::memcpy(&rest_bits, &rest, sizeof(rest_bits));
    hi[i] = static_cast<uint16_t>(top);
    lo[i] = (top & 0x7F80) == 0x7F80 ? 0 : static_cast<uint16_t>(
        NearestBfloat16<uint32_t>(rest_bits, rest != rest));
  }
}

// x [rows, k] float32 against bfloat16 panels, on the tiles: x's rows as their two bfloat16
// parts (SplitBfloat16), each in rows of a multiple of 32 inputs (zeros past k) that start on a
// cache line, the lo parts `rows * k_pad` after the hi ones.
template <typename Write>
void MultiplyOnTiles(ffi::ThreadPool& pool, const float* x_data, const uint16_t* panels,
                     int64_t rows, int64_t k, int64_t num_panels, bool gated, Write write) {
  const Items<uint16_t> items{panels, rows, num_panels, PanelSize<uint16_t>(k), gated};
  const int64_t k_pad = items.panel_size / kPanel, x_part = rows * k_pad;
  thread_local std::vector<uint16_t> storage;  // kept across calls: no pages to fault in each time
  uint16_t* x = CacheAligned(storage, 2 * x_part);
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t *hi = x + r * k_pad, *lo = hi + x_part;
    SplitBfloat16(x_data + r * k, hi, lo, k);
    std::fill(hi + k, hi + k_pad, uint16_t{0});
    std::fill(lo + k, lo + k_pad, uint16_t{0});
  }
  RunItems(pool, items, [=](int64_t first_row, int64_t rows, int64_t p, const uint16_t* next,
                            float (*sums)[kPanel]) {
    TilePanel(x + first_row * k_pad, x_part, rows, panels + p * items.panel_size, next, k_pad,
              sums);
  }, write);
}
#endif

#if FLOVER_TILES
// float32 on the tiles: each value v is split into three bfloat16 parts, v = hi + mid + lo
// exactly (each part rounds what the ones before left; 3 x 8 bits of mantissa hold float32's
// 24), and x @ W sums the six products of parts whose size reaches float32's precision (hi hi,
// hi mid, mid hi, mid mid, hi lo, lo hi: what TPUs do for float32 at HIGHEST). Each product of
// parts is exact in float32, so against the FMAs this changes the order of the sums only: the
// error stays within float32's bound for a sum (tests/test_kernels.py). Worth it where many
// rows share a panel (a prompt's): a panel is split once per item, its tiles then serve every
// 16 rows of the item; at a few rows the split costs more than the tiles save.

constexpr int64_t kSplitRowBlock = 256;  // rows per item: the panel's split serves all of them

// 32 float32 values (low: the first 16) as their three bfloat16 parts, in the same order.
inline void SplitParts(__m512 low, __m512 high, uint16_t* hi, uint16_t* mid, uint16_t* lo) {
  uint16_t* parts[2] = {hi, mid};
  for (int part = 0; part < 2; ++part) {
    const __m512i bits = (__m512i)_mm512_cvtne2ps_pbh(high, low);  // lanes 0-15 from `low`
    _mm512_store_si512(parts[part], bits);
    const __m512 low_part = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(bits)), 16));
    const __m512 high_part = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(bits, 1)), 16));
    low = _mm512_sub_ps(low, low_part), high = _mm512_sub_ps(high, high_part);
  }
  _mm512_store_si512(lo, (__m512i)_mm512_cvtne2ps_pbh(high, low));  // what is left fits exactly
}

// x [rows, k] float32 as its parts [3][rows rounded up to 16][k_pad] bfloat16, zeros past rows
// and k; returns the first part (the others follow, `part_size` apart).
uint16_t* SplitRows(const float* x, int64_t rows, int64_t k, int64_t k_pad, int64_t part_size,
                    std::vector<uint16_t>& storage) {
  uint16_t* parts = CacheAligned(storage, 3 * part_size);
  for (int64_t r = 0; r < part_size / k_pad; ++r) {
    for (int64_t i = 0; i < k_pad; i += 32) {
      __m512 half[2];
      for (int h = 0; h < 2; ++h) {  // 16 values, zeros past k and past the rows
        const int64_t at = i + 16 * h, live = r < rows ? std::clamp<int64_t>(k - at, 0, 16) : 0;
        half[h] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << live) - 1), x + r * k + at);
      }
      uint16_t* out = parts + r * k_pad + i;
      SplitParts(half[0], half[1], out, out + part_size, out + 2 * part_size);
    }
  }
  return parts;
}

// One float32 panel [k, 48] as its parts' B tiles: [3][k_pad / 32][3][16][32] bfloat16, each
// tile (16 pairs of inputs x 16 columns, a pair's two side by side) a contiguous 1 kB.
void SplitPanel(const float* panel, int64_t k, int64_t k_pad, uint16_t* tiles) {
  const int64_t part_size = k_pad * kPanel;
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                          24, 8);
  for (int64_t i = 0; i < k_pad; i += 2) {
    for (int c = 0; c < 3; ++c) {
      const __m512 even = i < k ? _mm512_loadu_ps(panel + i * kPanel + 16 * c) : _mm512_setzero_ps();
      const __m512 odd = i + 1 < k ? _mm512_loadu_ps(panel + (i + 1) * kPanel + 16 * c)
                                   : _mm512_setzero_ps();
      uint16_t* out = tiles + (((i / 32) * 3 + c) * 16 + (i % 32) / 2) * 32;
      SplitParts(_mm512_permutex2var_ps(even, first, odd), _mm512_permutex2var_ps(even, second, odd),
                 out, out + part_size, out + 2 * part_size);
    }
  }
}

// Rows [0, rows) of x's parts (row stride k_pad, parts `x_part` apart) against one panel's
// parts' tiles (SplitPanel), 16 rows at a time, each 16 rows' sums [16, 48] handed to
// done(first row, rows, sums). C 0-2: the sums; A 3-5: the rows' parts; B 6-7: the panel's.
template <typename Done>
void SplitTilePanel(const uint16_t* x, int64_t x_part, int64_t rows, const uint16_t* b_tiles,
                    int64_t k_pad, Prefetcher& ahead, Done done) {
  const int64_t steps = k_pad / kPairBlock, b_part = k_pad * kPanel;
  const int64_t a_stride = k_pad * sizeof(uint16_t);
  ConfigureTiles(16);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t s = 0; s < steps; ++s) {
      const uint16_t* a = x + r0 * k_pad + s * kPairBlock;
      _tile_loadd(3, a, a_stride);
      _tile_loadd(4, a + x_part, a_stride);
      _tile_loadd(5, a + 2 * x_part, a_stride);
      const uint16_t* b = b_tiles + s * 3 * 512;
      // Per 16 columns: x hi, mid, lo times W hi; x hi, mid times W mid; x hi times W lo.
#define FLOVER_SIX_PRODUCTS(c, X, Y)          \
  _tile_loadd(X, b + (c) * 512, 64);          \
  _tile_dpbf16ps(c, 3, X);                    \
  _tile_dpbf16ps(c, 4, X);                    \
  _tile_loadd(Y, b + b_part + (c) * 512, 64); \
  _tile_dpbf16ps(c, 5, X);                    \
  _tile_dpbf16ps(c, 3, Y);                    \
  _tile_dpbf16ps(c, 4, Y);                    \
  _tile_loadd(X, b + 2 * b_part + (c) * 512, 64); \
  _tile_dpbf16ps(c, 3, X);
      FLOVER_SIX_PRODUCTS(0, 6, 7)
      FLOVER_SIX_PRODUCTS(1, 7, 6)
      FLOVER_SIX_PRODUCTS(2, 6, 7)
#undef FLOVER_SIX_PRODUCTS
      ahead.Step();
    }
    alignas(64) float sums[16][kPanel];
    _tile_stored(0, sums[0], kPanel * sizeof(float));
    _tile_stored(1, sums[0] + 16, kPanel * sizeof(float));
    _tile_stored(2, sums[0] + 32, kPanel * sizeof(float));
    done(r0, std::min<int64_t>(16, rows - r0), sums);
  }
  _tile_release();
}

// x [rows, k] float32 against float32 panels [p, k, 48] (gated: in pairs), on the tiles as
// bfloat16 parts; each 16 rows' sums go to write(columns, first_row, rows, sums) (a gated
// item's as silu(gate) * up).
template <typename Write>
void MultiplySplitOnTiles(ffi::ThreadPool& pool, const float* x, const float* panels,
                          int64_t rows, int64_t k, int64_t num_panels, bool gated, Write write) {
  Items<float> items{panels, rows, num_panels, PanelSize<float>(k), gated, kSplitRowBlock};
  const int64_t k_pad = (k + kPairBlock - 1) / kPairBlock * kPairBlock;
  const int64_t x_part = (rows + 15) / 16 * 16 * k_pad, b_part = k_pad * kPanel;
  thread_local std::vector<uint16_t> storage;  // kept across calls: no pages to fault in each time
  const uint16_t* parts = SplitRows(x, rows, k, k_pad, x_part, storage);
  ParallelFor(pool, items.count(), [=](int64_t item, int64_t next) {
    thread_local std::vector<uint16_t> scratch;
    uint16_t* b_tiles = CacheAligned(scratch, 3 * b_part * items.per_item());
    const int64_t first_row = items.first_row(item), item_rows = items.rows_of(item);
    const int64_t p = items.panel(item), columns = items.columns(item);
    for (int64_t i = 0; i < items.per_item(); ++i)
      SplitPanel(panels + (p + i) * items.panel_size, k, k_pad, b_tiles + 3 * b_part * i);
    const float* next_panel = items.next_panel(item, next);
    Prefetcher ahead = Prefetcher::Over(next_panel, items.per_item() * items.panel_size * sizeof(float),
                                        items.per_item() * k_pad / kPairBlock * ((item_rows + 15) / 16));
    const uint16_t* x_rows = parts + first_row * k_pad;
    if (!gated) {
      SplitTilePanel(x_rows, x_part, item_rows, b_tiles, k_pad, ahead,
                     [&](int64_t r0, int64_t m, float (*sums)[kPanel]) {
        write(columns, first_row + r0, m, sums);
      });
      return;
    }
    // A gated item: every 16 rows' gate sums, then their up sums (the tiles hold one panel's).
    alignas(64) float gate[kSplitRowBlock][kPanel];
    SplitTilePanel(x_rows, x_part, item_rows, b_tiles, k_pad, ahead,
                   [&](int64_t r0, int64_t m, float (*sums)[kPanel]) {
      std::memcpy(gate[r0], sums[0], m * kPanel * sizeof(float));
    });
    SplitTilePanel(x_rows, x_part, item_rows, b_tiles + 3 * b_part, k_pad, ahead,
                   [&](int64_t r0, int64_t m, float (*sums)[kPanel]) {
      for (int64_t r = 0; r < m; ++r) SiluTimesUp(gate[r0 + r], sums[r]);
      write(columns, first_row + r0, m, &gate[r0]);
    });
  });
}
#endif  // FLOVER_TILES

// Whether v displaces `best` in an argmax that keeps the first of equal values and takes the
// first NaN (as jnp.argmax does).
inline bool Displaces(float v, float best) { return best == best && (v != v || v > best); }

// x @ the panels (x, panels and scales as PackedMatmul checks them), each item's sums handed
// to write(columns, first_row, rows, sums) (RunItems). n: the output columns.
template <typename Write>
ffi::Error MultiplyAny(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer panels,
                       ffi::Buffer<ffi::F32> scales, bool gated, bool on_tiles, int64_t n,
                       Write write) {
  const auto xd = x.dimensions(), pd = panels.dimensions();
  const auto type = panels.element_type();
  const bool int8 = type == ffi::DataType::S8, pairs = type == ffi::DataType::BF16;
  const int64_t k = xd.size() == 2 ? xd[1] : -1;
  const int64_t panel_rows = pairs ? PanelSize<uint16_t>(k) / kPanel / 2 : k;
  const int64_t blocks = pd.size() == 3 ? pd[0] / (gated ? 2 : 1) : 0;  // of 48 output columns
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != (pairs ? 2 : 1) * kPanel ||
      pd[1] != panel_rows || (gated && pd[0] % 2) || n > blocks * kPanel ||
      n <= (blocks - 1) * kPanel ||
      scales.element_count() != (int8 ? pd[0] * ((k + kGroup - 1) / kGroup) * kPanel : 0)) {
    return ffi::Error::InvalidArgument(
        "packed_matmul: expected x [rows, k], panels [p, k, 48] "
        "(float32, int8) or [p, ceil(k / 32) * 16, 96] (bfloat16), scales [p, ceil(k / 64), 48] "
        "(int8 panels) or [0] (others) and n outputs with 48 (b - 1) < n <= 48 b, b = p "
        "(gated: p / 2, p even)");
  }
  const int64_t rows = xd[0], num_panels = pd[0];
  const void* data = panels.untyped_data();
  const float* x_data = x.typed_data();
  if (on_tiles) {
#if FLOVER_TILES
    if (pairs && TilesPermitted()) {
      MultiplyOnTiles(pool, x_data, static_cast<const uint16_t*>(data), rows, k, num_panels,
                      gated, write);
      return ffi::Error::Success();
    }
    if (type == ffi::DataType::F32 && TilesPermitted()) {
      MultiplySplitOnTiles(pool, x_data, static_cast<const float*>(data), rows, k, num_panels,
                           gated, write);
      return ffi::Error::Success();
    }
#endif
    return ffi::Error::InvalidArgument(
        "packed_matmul: tiles are for bfloat16 and float32 panels, where the CPU has AMX tiles");
  }
  switch (type) {
    case ffi::DataType::F32:
      Multiply(pool, x_data, static_cast<const float*>(data), nullptr, rows, k, num_panels, gated,
               write);
      break;
    case ffi::DataType::BF16:
      Multiply(pool, x_data, static_cast<const uint16_t*>(data), nullptr, rows, k, num_panels,
               gated, write);
      break;
    case ffi::DataType::S8:
      Multiply(pool, x_data, static_cast<const int8_t*>(data), scales.typed_data(), rows, k,
               num_panels, gated, write);
      break;
    default:
      return ffi::Error::InvalidArgument("packed_matmul: panels must be float32, bfloat16 or int8");
  }
  return ffi::Error::Success();
}

// out [rows, n] = x @ the panels (for gated ones silu(x @ gate) * (x @ up)).
ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer panels,
                        ffi::Buffer<ffi::F32> scales, bool gated, bool tiles,
                        ffi::ResultBuffer<ffi::F32> out) {
  const auto od = out->dimensions();
  if (od.size() != 2 || x.dimensions().size() != 2 || od[0] != x.dimensions()[0]) {
    return ffi::Error::InvalidArgument("packed_matmul: expected out [rows, n] for x [rows, k]");
  }
  const int64_t n = od[1];
  float* y = out->typed_data();
  return MultiplyAny(pool, x, panels, scales, gated, tiles, n,
                     [=](int64_t columns, int64_t first_row, int64_t rows, float (*sums)[kPanel]) {
    const int64_t cols = std::min(kPanel, n - columns * kPanel);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(y + (first_row + r) * n + columns * kPanel, sums[r], cols * sizeof(float));
    }
  });
}

// out [rows] = the first index of each row's largest value in x @ the panels (n columns; a NaN
// counts as the largest), without writing the [rows, n] products: a greedy LM head's argmax.
// Each item keeps its rows' best of its 48 columns; the blocks' bests are then taken in order,
// so the result is jnp.argmax's over the same products, whatever the threads did first.
ffi::Error PackedArgmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer panels,
                        ffi::Buffer<ffi::F32> scales, bool tiles, int64_t n,
                        ffi::ResultBuffer<ffi::S32> out) {
  const int64_t rows = x.dimensions().size() == 2 ? x.dimensions()[0] : -1;
  if (out->element_count() != rows) {
    return ffi::Error::InvalidArgument("packed_argmax: expected out [rows] for x [rows, k]");
  }
  const int64_t blocks = (n + kPanel - 1) / kPanel;
  std::vector<float> best(std::max<int64_t>(rows, 0) * blocks);
  std::vector<int32_t> where(best.size());
  float* best_data = best.data();
  int32_t* where_data = where.data();
  ffi::Error error = MultiplyAny(
      pool, x, panels, scales, /*gated=*/false, tiles, n,
      [=](int64_t columns, int64_t first_row, int64_t rows, float (*sums)[kPanel]) {
        const int64_t cols = std::min(kPanel, n - columns * kPanel);
        for (int64_t r = 0; r < rows; ++r) {
          int64_t at = 0;
          for (int64_t c = 1; c < cols; ++c) at = Displaces(sums[r][c], sums[r][at]) ? c : at;
          best_data[(first_row + r) * blocks + columns] = sums[r][at];
          where_data[(first_row + r) * blocks + columns] = static_cast<int32_t>(columns * kPanel + at);
        }
      });
  if (error.failure()) return error;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t at = 0;
    for (int64_t b = 1; b < blocks; ++b) at = Displaces(best[r * blocks + b], best[r * blocks + at]) ? b : at;
    out->typed_data()[r] = where[r * blocks + at];
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
                                  .Attr<bool>("gated")            // panels in (gate, up) pairs
                                  .Attr<bool>("tiles")            // bfloat16 panels on AMX tiles
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloverPackedArgmax, PackedArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::AnyBuffer>()          // panels
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scales
                                  .Attr<bool>("tiles")            // bfloat16 panels on AMX tiles
                                  .Attr<int64_t>("n")             // output columns
                                  .Ret<ffi::Buffer<ffi::S32>>());  // out

// 1 where this build and process can multiply on AMX tiles, else 0.
extern "C" int FloverTilesAvailable() { return TilesPermitted() ? 1 : 0; }
